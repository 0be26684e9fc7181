"""The teacher cache: built once over whole sequences, read back exactly, refused when stale."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY, build_small_tokenizer, cache_config

from essence.data.batching import collate
from essence.data.pipeline import prepare
from essence.errors import EssenceError
from essence.models.loading import random_causal_lm
from essence.teacher.cache_build import build_cache
from essence.teacher.sources import CachedTeacher, OnlineTeacher
from essence.train.run import train
from essence.train.step import DistillStep, combine, loss_weights, step_token_counts

TEACHER = dict(TINY, hidden_size=24)


config_for = cache_config


@pytest.fixture(scope="module")
def exact_cache(tokenizer_dir, data_file, tmp_path_factory):
    """k = the whole vocabulary, float32: the cache holds the teacher's full distribution."""
    out = tmp_path_factory.mktemp("cache") / "exact"
    config = config_for(tokenizer_dir, data_file, "model.teacher_cache_k=100000",
                        "model.teacher_cache_dtype=float32")
    manifest = build_cache(config, out, batch_size=3, shard_records=4, progress=False)
    return out, manifest


def step_outputs(config, teacher, student, tokenizer, examples):
    """Loss sums and the student's gradient over examples, one micro-batch of all of them."""
    step = DistillStep(student, config.loss, len(tokenizer))
    student.zero_grad()
    batch = collate(examples, tokenizer.pad_token_id)
    weights = loss_weights(*step_token_counts([batch]), config.loss.kd_ratio)
    out = step(batch.input_ids, batch.attention_mask, batch.nll_mask, batch.kd_mask,
               teacher(batch.input_ids, batch.attention_mask, batch.record_ids), weights)
    combine(out, weights).backward()
    return out.nll.item(), out.kd.item(), torch.cat([p.grad.flatten() for p in student.parameters()])


@pytest.mark.parametrize("lsp,divergence", [(1.0, "forward_kl"), (0.5, "forward_kl"), (0.5, "js")])
def test_full_vocabulary_cache_equals_the_online_teacher(exact_cache, tokenizer_dir, data_file,
                                                         lsp, divergence):
    """One cache of whole sequences serves LSP 1 and LSP 0.5 exactly (causal attention)."""
    out, manifest = exact_cache
    tokenizer = build_small_tokenizer()
    assert manifest["settings"]["k"] == len(tokenizer)
    config = config_for(tokenizer_dir, data_file, f"data.truncation.lsp={lsp}",
                        f"loss.divergence={divergence}", f"model.teacher_cache={out}",
                        f"model.teacher_cache_k={len(tokenizer)}", "model.teacher_cache_dtype=float32")
    prepared = prepare(config.data, tokenizer)
    examples = prepared.examples[:4]
    cached = CachedTeacher(config, torch.device("cpu"))
    kept, _ = cached.bind(tokenizer, prepared, examples, [])
    assert len(kept) == 4
    online = OnlineTeacher(random_causal_lm(TEACHER, len(tokenizer), seed=1), torch.device("cpu"))
    student = random_causal_lm(TINY, len(tokenizer), seed=0)
    a = step_outputs(config, online, student, tokenizer, examples)
    b = step_outputs(config, cached, student, tokenizer, examples)
    assert a[1] > 0
    assert b[0] == pytest.approx(a[0], rel=1e-6)
    assert b[1] == pytest.approx(a[1], rel=1e-4, abs=1e-6)
    torch.testing.assert_close(b[2], a[2], rtol=1e-4, atol=1e-6)


def test_full_context_serves_each_kept_target_from_the_whole_sequence(exact_cache, tokenizer_dir,
                                                                    data_file):
    """cot_lead keeps a non-prefix: the target after the cut gets the teacher's whole-sequence
    distribution over that token (cache row j − 1 for original token j)."""
    out, _ = exact_cache
    tokenizer = build_small_tokenizer()
    vocab = len(tokenizer)
    config = config_for(tokenizer_dir, data_file, "data.truncation.cot_lead=0.3",
                        "model.teacher_context=full", f"model.teacher_cache={out}",
                        f"model.teacher_cache_k={vocab}", "model.teacher_cache_dtype=float32")
    prepared = prepare(config.data, tokenizer)
    cached = CachedTeacher(config, torch.device("cpu"))
    cached.bind(tokenizer, prepared, prepared.examples[:1], [])
    index = prepared.kept[0].indices()
    assert index != list(range(len(index)))  # a gap: not a lead span
    batch = collate(prepared.examples[:1], tokenizer.pad_token_id)
    sparse = cached(batch.input_ids, batch.attention_mask, batch.record_ids).sparse
    n = len(index) - 1
    got = torch.empty(n, vocab).scatter_(1, sparse.ids[0, :n], sparse.logp[0, :n])
    teacher = random_causal_lm(TEACHER, vocab, seed=1)
    with torch.no_grad():
        full = torch.log_softmax(teacher(torch.tensor([prepared.rendered[0].input_ids])).logits[0], -1)
    torch.testing.assert_close(got, full[[j - 1 for j in index[1:]], :vocab], rtol=1e-4, atol=1e-5)
    assert cached.summary()["teacher_context"] == "full"


def test_cached_training_run_charges_no_teacher(exact_cache, tokenizer_dir, data_file, tmp_path):
    out, manifest = exact_cache
    common = ["data.truncation.lsp=0.5", "train.max_steps=2"]
    online = train(config_for(tokenizer_dir, data_file, *common), tmp_path / "online")
    cached = train(config_for(tokenizer_dir, data_file, *common, f"model.teacher_cache={out}",
                              "model.teacher_cache_k=32"), tmp_path / "cached")
    assert cached["teacher_source"] == "cache" and cached["teacher_ran"] is False
    assert cached["teacher_flops"] == 0 and online["teacher_flops"] > 0
    assert cached["teacher_flops_cached"] == pytest.approx(online["teacher_flops"])
    assert cached["kd_tokens"] == online["kd_tokens"]
    assert cached["teacher_cache_flops"] == manifest["teacher_pass"]["flops"] > 0
    assert cached["teacher_cache_k"] == 32


def test_killed_build_resumes_to_identical_bytes(tokenizer_dir, data_file, tmp_path, monkeypatch):
    config = config_for(tokenizer_dir, data_file, "model.teacher_cache_k=8")
    straight = build_cache(config, tmp_path / "straight", shard_records=2, progress=False)
    from essence.teacher import cache_build

    original, calls = cache_build._write_shard, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # two shards written, killed while writing the third
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_build, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build_cache(config, tmp_path / "killed", shard_records=2, progress=False)
    assert not (tmp_path / "killed" / "manifest.json").exists()
    monkeypatch.setattr(cache_build, "_write_shard", original)
    resumed = build_cache(config, tmp_path / "killed", shard_records=2, progress=False)
    assert calls["n"] == 3  # the resumed build rewrote only the missing shards

    def untimed(manifest):  # the pass's time differs, and so the manifest's own checksum
        return {k: v for k, v in manifest.items() if k not in ("teacher_pass", "sha256")}

    assert untimed(resumed) == untimed(straight)
    assert resumed["teacher_pass"]["flops"] == straight["teacher_pass"]["flops"]
    bins = sorted(p.name for p in (tmp_path / "straight").glob("shard-*.bin"))
    assert len(bins) == straight["records"] // 2 + straight["records"] % 2 >= 4
    for name in bins:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    # fp16 top-8 + tail: 8·(2 + 2) + 4 bytes per target position.
    assert straight["bytes_per_token"] == 36


def bind(config, tokenizer_dir):
    tokenizer = build_small_tokenizer()
    prepared = prepare(config.data, tokenizer)
    teacher = CachedTeacher(config, torch.device("cpu"))
    return teacher, teacher.bind(tokenizer, prepared, prepared.examples, [])


def test_stale_caches_are_refused_naming_what_differs(exact_cache, tokenizer_dir, data_file,
                                                      tmp_path):
    out, _ = exact_cache
    use = [f"model.teacher_cache={out}", "model.teacher_cache_k=32"]
    with pytest.raises(EssenceError, match="teacher: experiment random-init"):
        bind(config_for(tokenizer_dir, data_file, *use, "train.seed=5"), tokenizer_dir)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(EssenceError, match="chat_template"):
        bind(config_for(tokenizer_dir, data_file, *use, f"data.chat_template={template}"),
             tokenizer_dir)
    with pytest.raises(EssenceError, match="data.max_length: experiment 100000, cache "):
        bind(config_for(tokenizer_dir, data_file, *use, "data.max_length=100000"), tokenizer_dir)
    other = tmp_path / "mix.jsonl"  # the same records, one answer edited: "data" differs
    rows = [json.loads(line) for line in Path(data_file).read_text().splitlines()]
    rows[0] = json.loads(json.dumps(rows[0]).replace("<|im_end|>", "").replace("1", "2", 1))
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EssenceError, match="data: experiment sha256"):
        bind(config_for(tokenizer_dir, other, *use), tokenizer_dir)
    with pytest.raises(EssenceError, match="holds topk k=.* asks for sampled"):
        bind(config_for(tokenizer_dir, data_file, *use, "model.teacher_cache_mode=sampled"),
             tokenizer_dir)
    with pytest.raises(EssenceError, match="holds no teacher cache"):
        bind(config_for(tokenizer_dir, data_file, f"model.teacher_cache={tmp_path}"), tokenizer_dir)


def test_damaged_shards_are_refused_naming_the_shard_and_the_rebuild(tokenizer_dir, data_file,
                                                                     tmp_path, capsys):
    """A flipped byte or a truncated shard is the cache's damage, not bad data: refused in one line
    whatever data.on_error says; building again redoes only the damaged shards."""
    from essence.teacher import cache_build

    out = tmp_path / "cache"
    config = config_for(tokenizer_dir, data_file, f"model.teacher_cache={out}",
                        "model.teacher_cache_k=4")
    manifest = build_cache(config, out, shard_records=3, progress=False)
    originals = {p.name: p.read_bytes() for p in out.glob("shard-*.bin")}
    first, last = manifest["shards"][0], manifest["shards"][-1]
    blob = bytearray(originals[first["file"]])
    blob[first["records"][1]["offset"] + 5] ^= 0xFF
    (out / first["file"]).write_bytes(bytes(blob))
    for on_error in ("fail", "skip"):
        with pytest.raises(EssenceError, match=rf"shard {out / first['file']} is damaged \(record "
                                               r".* does not match its checksum\); rebuild it with "
                                               rf"essence teacher cache CONFIG --out {out} "):
            bind(replace(config, data=replace(config.data, on_error=on_error)), tokenizer_dir)
    (out / last["file"]).write_bytes(originals[last["file"]][:-10])
    with pytest.raises(EssenceError, match=r"shard .* is (damaged|missing or truncated)"):
        bind(config, tokenizer_dir)
    calls = []
    original = cache_build._write_shard
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache_build, "_write_shard", lambda *a: calls.append(a[1]) or original(*a))
        repaired = build_cache(config, out, shard_records=3, progress=False)
    notes = capsys.readouterr().out
    assert f"{first['file']}: record" in notes and "rebuilding it" in notes
    assert sorted(calls) == [0, len(manifest["shards"]) - 1]  # only the damaged ones were redone
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.bin")} == originals
    assert repaired["shards"] == manifest["shards"]
    teacher, (kept, _) = bind(config, tokenizer_dir)
    assert len(kept) == manifest["records"] and not teacher.skipped


def test_a_changed_manifest_is_refused(tokenizer_dir, data_file, tmp_path):
    out = tmp_path / "cache"
    config = config_for(tokenizer_dir, data_file, f"model.teacher_cache={out}",
                        "model.teacher_cache_k=4")
    build_cache(config, out, shard_records=3, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["records"][0]["offset"] += 1  # still valid JSON, no longer the truth
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EssenceError, match=r"is damaged: manifest.json does not match its "
                                           r"checksum; rebuild it with essence teacher cache"):
        bind(config, tokenizer_dir)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(EssenceError, match=r"cannot read manifest.json .*; rebuild it"):
        bind(config, tokenizer_dir)
    build_cache(config, out, shard_records=3, progress=False)  # rebuilt from the shard indices
    assert len(bind(config, tokenizer_dir)[1][0]) == manifest["records"]


def test_sampled_cache_trains_forward_kl(tokenizer_dir, data_file, tmp_path):
    out = tmp_path / "sampled"
    sampled = ["model.teacher_cache_mode=sampled", "model.teacher_cache_k=16"]
    manifest = build_cache(config_for(tokenizer_dir, data_file, *sampled), out, progress=False)
    assert manifest["bytes_per_token"] == 16 * (2 + 1 + 2)
    summary = train(config_for(tokenizer_dir, data_file, *sampled, f"model.teacher_cache={out}",
                               "train.max_steps=2"), tmp_path / "run")
    assert summary["teacher_source"] == "cache" and summary["kd_tokens"] > 0
    with pytest.raises(EssenceError, match="sampled estimates forward_kl only"):
        config_for(tokenizer_dir, data_file, *sampled, "loss.divergence=js")


def test_non_prefix_truncation_must_choose_the_teacher_context(tokenizer_dir, data_file):
    with pytest.raises(EssenceError, match="Set model.teacher_context: full"):
        config_for(tokenizer_dir, data_file, "model.teacher_cache=x", "data.truncation.cot_lead=0.5")
    with pytest.raises(EssenceError, match="full needs model.teacher_cache"):
        config_for(tokenizer_dir, data_file, "model.teacher_context=full",
                   "data.truncation.window=0.5", "data.truncation.window_position=right")
    config_for(tokenizer_dir, data_file, "model.teacher_cache=x", "data.truncation.lsp=0.5")


def test_sweep_builds_one_cache_per_fingerprint(tokenizer_dir, data_file, tmp_path, monkeypatch):
    """A grid over LSP shares a cache; a grid over a render setting gets one cache per value."""
    from essence.config.load import save_config
    from essence.experiments.report import build_report
    from essence.experiments.sweep import run_sweep
    from essence.teacher import cache_build

    built = []
    original = cache_build.build_cache
    monkeypatch.setattr(cache_build, "build_cache",
                        lambda config, out, **kw: built.append(out) or original(config, out, **kw))
    config_file = tmp_path / "c.yaml"
    save_config(config_for(tokenizer_dir, data_file, "train.max_steps=1", "model.teacher_cache_k=8",
                           f"model.teacher_cache={tmp_path / 'caches'}"), config_file)
    results = run_sweep(str(config_file), ["data.truncation.lsp=1.0,0.5",
                                           "data.max_length=30000,32000"], tmp_path / "runs")
    assert all(r == "complete" for r in results.values()), results
    assert len(built) == 2 and len(list((tmp_path / "caches").glob("fp-*/manifest.json"))) == 2
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/summary.json")]
    assert len({s["teacher_cache"] for s in summaries}) == 2
    assert all(s["teacher_flops"] == 0 for s in summaries)
    build_report(tmp_path / "runs")
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "2 cache pass(es)" in report and "with every teacher run online" in report


def test_cache_command(tokenizer_dir, data_file, tmp_path, capsys):
    from essence.cli import main
    from essence.config.load import save_config

    config_file = tmp_path / "c.yaml"
    save_config(config_for(tokenizer_dir, data_file), config_file)
    out = tmp_path / "cache"
    assert main(["teacher", "cache", str(config_file), "model.teacher_cache_k=4", "--out", str(out),
                 "--batch-size", "2"]) == 0
    assert "20.0 bytes/token" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["settings"]["k"] == 4
    assert main(["teacher", "cache", str(config_file), "--out", str(out), "--batch-size", "0"]) == 2
    assert "--batch-size=0 must be at least 1" in capsys.readouterr().err
    # The same folder, other settings: refused, not mixed.
    assert main(["teacher", "cache", str(config_file), "model.teacher_cache_k=8", "--out", str(out)]) == 2
    assert "holds a teacher cache of another experiment" in capsys.readouterr().err
    # An --out below a file is one line, not a traceback.
    (tmp_path / "afile").write_text("x")
    assert main(["teacher", "cache", str(config_file), "--out", str(tmp_path / "afile" / "c")]) == 2
    assert "which is a file; choose another --out" in capsys.readouterr().err


@pytest.mark.parametrize("vocab", [400, 65536, 151936])
def test_blobs_round_trip_at_every_vocabulary_width(vocab):
    import numpy as np

    from essence.teacher.cache_format import (
        CacheSettings,
        RecordTargets,
        decode,
        encode,
        row_bytes,
    )

    rng = np.random.default_rng(0)
    settings = CacheSettings(k=5)
    ids = rng.integers(0, vocab, size=(7, 5))
    ids[0, 0] = vocab - 1
    logp = -rng.random((7, 5), dtype=np.float32) * 20
    tail = np.array([-np.inf, *(-rng.random(6, dtype=np.float32))], dtype=np.float32)
    blob = encode(RecordTargets(ids, logp, tail, None), settings, vocab)
    id_bytes = 2 if vocab <= 65536 else 3
    assert len(blob) == 7 * row_bytes(settings, vocab) == 7 * (5 * id_bytes + 5 * 2 + 4)
    back = decode(blob, 7, settings, vocab)
    assert (back.ids == ids).all() and (back.tail == tail).all()
    np.testing.assert_allclose(back.logp, logp, rtol=1e-3)
