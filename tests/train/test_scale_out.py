"""Scale-out options on CPU: FSDP2 over gloo, LoRA, packing, schedule-free AdamW, torch.compile."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, build_small_tokenizer, free_port, metrics, tiny_config

from essence.config.load import load_config, save_config
from essence.data.batching import collate
from essence.data.pipeline import prepare
from essence.errors import EssenceError
from essence.models.flops import flop_model
from essence.models.loading import random_causal_lm
from essence.teacher.sources import OnlineTeacher
from essence.train.run import train
from essence.train.step import DistillStep, combine, step_token_counts

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def killed_and_resumed(config, run: Path, monkeypatch, die_at: int) -> dict:
    """Train into run, dying in step die_at + 1; then --resume to the end."""
    from essence.train import loop as train_module

    original = train_module.Trainer.optimizer_step

    def dying(self, batches):
        if self.step == die_at:
            raise KeyboardInterrupt
        return original(self, batches)

    monkeypatch.setattr(train_module.Trainer, "optimizer_step", dying)
    with pytest.raises(KeyboardInterrupt):
        train(config, run)
    monkeypatch.setattr(train_module.Trainer, "optimizer_step", original)
    return train(config, run, resume=True)


def assert_same_losses(a: Path, b: Path, rel: float = 1e-6) -> None:
    first, second = metrics(a), metrics(b)
    assert [m["step"] for m in first] == [m["step"] for m in second]
    for x, y in zip(first, second):
        assert x["loss"] == pytest.approx(y["loss"], rel=rel, abs=1e-9), (x["step"], x, y)


# ---------------------------------------------------------------------------------------------
# FSDP2


@pytest.mark.slow
def test_fsdp2_two_processes_match_accumulation_and_resume(tokenizer_dir, data_file, tmp_path):
    """Two gloo processes under the shipped FSDP2 accelerate config = one process accumulating 2
    micro-batches, step by step, including a --resume from a checkpoint written under FSDP2."""
    # A constant learning rate (min_lr_ratio 1): the first launch stops at step 2, and a cosine
    # over 2 steps would differ from the one over 3 that the resumed run and the reference use.
    common = ["train.batch_size=1", "train.epochs=2", "train.save_every=1", "train.cpu_threads=1",
              "train.min_lr_ratio=1"]
    config_file = tmp_path / "c.yaml"
    save_config(tiny_config(tokenizer_dir, data_file, *common, "train.max_steps=2"), config_file)
    for extra in ([], ["train.max_steps=3", "--resume"]):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "configs/accelerate/fsdp2.yaml"), "--num_processes", "2",
                  "--main_process_port", str(free_port()), "--mixed_precision", "no",
                  "-m", "essence", "train", str(config_file), "--out", str(tmp_path / "fsdp")]
        done = subprocess.run(launch + extra, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    single = train(tiny_config(tokenizer_dir, data_file, *common, "train.max_steps=3",
                               "train.grad_accum=2"), tmp_path / "single")
    assert "resumed from" in done.stdout
    fsdp = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert fsdp["processes"] == 2 and fsdp["student_tokens"] == single["student_tokens"]
    assert fsdp["engine"] == "fsdp2"
    assert_same_losses(tmp_path / "fsdp", tmp_path / "single", rel=1e-5)
    # The saved student is a whole Hugging Face model (gathered from the shards), and the
    # optimizer state in the checkpoint is whole too.
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "model")
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    state = torch.load(tmp_path / "fsdp" / "checkpoints" / "step-000003" / "trainer_state.pt",
                       weights_only=False)
    moments = [s["exp_avg"].shape for s in state["optimizer"]["state"].values()]
    assert sorted(moments) == sorted(p.shape for p in ours.parameters())


@pytest.mark.slow
def test_sharded_head_and_teacher_gather():
    """The gather logic alone, on two gloo processes: a sharded head reassembled equals the full
    head, its gradient lands on this process's shard, and a sharded teacher equals a whole one."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()),
                           str(REPO / "tests" / "train" / "fsdp_gather_check.py")],
                          env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("gather ok") == 2


# ---------------------------------------------------------------------------------------------
# Packing


def _models(tokenizer):
    student = random_causal_lm(TINY, len(tokenizer), seed=0)
    teacher = OnlineTeacher(random_causal_lm(dict(TINY, hidden_size=24), len(tokenizer), 1),
                            torch.device("cpu"))
    return student, teacher


def test_packed_batch_gives_each_sequence_its_unpacked_loss(tokenizer_dir, data_file):
    config = tiny_config(tokenizer_dir, data_file)
    tokenizer = build_small_tokenizer()
    examples = prepare(config.data, tokenizer).examples[:4]
    student, teacher = _models(tokenizer)
    step = DistillStep(student, config.loss, len(tokenizer))
    padded = collate(examples, tokenizer.pad_token_id)
    packed = collate(examples, tokenizer.pad_token_id, pack=True)
    assert packed.input_ids.shape == (1, sum(len(e) for e in examples)) and packed.padding == 0
    assert packed.sequence_lengths() == [len(e) for e in examples] == padded.sequence_lengths()
    assert step_token_counts([packed]) == step_token_counts([padded])

    def per_sequence(batch, i):
        """Loss sums and student gradient with only sequence i's targets selected."""
        keep = batch.sequence_index() == i
        student.zero_grad()
        out = step(batch.input_ids, batch.attention_mask, batch.nll_mask & keep, batch.kd_mask & keep,
                   teacher(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids),
                   position_ids=batch.position_ids)
        combine(out, (1.0, 1.0)).backward()
        grad = torch.cat([p.grad.flatten() for p in student.parameters()])
        return torch.stack([out.nll, out.kd]).detach(), grad

    for i in range(len(examples)):
        (a, ga), (b, gb) = per_sequence(padded, i), per_sequence(packed, i)
        assert float(a[0]) > 0 and float(a[1]) > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_packed_run_trains_like_padded_without_padding(tokenizer_dir, data_file, tmp_path):
    common = ["train.max_steps=3", "train.batch_size=3", "train.cpu_threads=1"]
    padded = train(tiny_config(tokenizer_dir, data_file, *common), tmp_path / "padded")
    packed = train(tiny_config(tokenizer_dir, data_file, *common, "data.packing=true"),
                   tmp_path / "packed")
    assert padded["padding_fraction"] > 0.05 and packed["padding_fraction"] == 0.0
    assert packed["student_tokens"] == padded["student_tokens"]
    # Attention is counted per packed sequence, so the FLOPs are the padded run's exactly.
    assert packed["student_flops"] == padded["student_flops"]
    assert packed["teacher_flops"] == padded["teacher_flops"]
    assert_same_losses(tmp_path / "packed", tmp_path / "padded", rel=1e-5)


# ---------------------------------------------------------------------------------------------
# LoRA


LORA = ["model.lora.rank=4", "train.lr=0.05", "train.cpu_threads=1"]


def test_lora_trains_adapters_only_saves_merged_and_adapter(tokenizer_dir, data_file, tmp_path,
                                                            monkeypatch):
    overrides = [*LORA, "train.max_steps=4", "train.save_every=2", "train.epochs=3"]
    straight = train(tiny_config(tokenizer_dir, data_file, *overrides), tmp_path / "straight")
    killed_and_resumed(tiny_config(tokenizer_dir, data_file, *overrides), tmp_path / "killed",
                       monkeypatch, die_at=3)
    assert_same_losses(tmp_path / "straight", tmp_path / "killed")
    losses = [m["loss"] for m in metrics(tmp_path / "straight")]
    assert losses[-1] < losses[0]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    vocab = len(build_small_tokenizer())
    base = random_causal_lm(TINY, vocab, seed=0)  # what training started from (train.seed 0)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "model")
    changed = [k for k, v in merged.state_dict().items()
               if not torch.equal(v, base.state_dict()[k])]
    # Only the adapted layers changed: q_proj and v_proj of each layer.
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    adapted = PeftModel.from_pretrained(random_causal_lm(TINY, vocab, seed=0),
                                        tmp_path / "straight" / "model" / "adapter")
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(ids).logits, adapted(ids).logits, atol=1e-4)
    # LoRA's FLOPs: 3·forward minus the weight gradients of the frozen body and head.
    full = train(tiny_config(tokenizer_dir, data_file, "train.max_steps=4", "train.epochs=3",
                             "train.cpu_threads=1", "train.save_checkpoints=false"), tmp_path / "full")
    assert straight["student_tokens"] == full["student_tokens"]
    assert 0.55 < straight["student_flops"] / full["student_flops"] < 0.95


def test_lora_flops_formula_and_merge_paths():
    from essence.config.schema import LoraSettings
    from essence.train.lora import _merge_gathered, apply_lora, merged_state_dict

    model = apply_lora(random_causal_lm(TINY, 64, seed=0), LoraSettings(rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    for module in model.modules():  # non-zero B, so the merge has something to fold in
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    flops = flop_model(model, 64)
    lora_params = sum(model.get_parameter(n).numel() for n in trainable)
    assert flops.head_frozen and flops.frozen == flops.params - lora_params
    lengths, rows = [10, 6], [9, 5]
    expected = 3 * flops.forward(lengths, rows) - 2 * flops.frozen * 16 - 2 * flops.head * 14
    assert flops.train(lengths, rows) == pytest.approx(expected)
    merged = merged_state_dict(model)
    gathered = _merge_gathered(model, model.state_dict())
    assert merged.keys() == gathered.keys() == random_causal_lm(TINY, 64, 0).state_dict().keys()
    for key in merged:
        torch.testing.assert_close(gathered[key], merged[key], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Schedule-free AdamW and torch.compile


def test_schedulefree_resumes_exactly_and_saves_evaluation_weights(tokenizer_dir, data_file,
                                                                   tmp_path, monkeypatch):
    overrides = ["train.optimizer=adamw_schedulefree", "train.max_steps=4", "train.save_every=2",
                 "train.epochs=3", "train.cpu_threads=1", "train.warmup_ratio=0.25",
                 "data.val_fraction=0.2", "train.val_every=1"]
    train(tiny_config(tokenizer_dir, data_file, *overrides), tmp_path / "straight")
    killed_and_resumed(tiny_config(tokenizer_dir, data_file, *overrides), tmp_path / "killed",
                       monkeypatch, die_at=3)
    assert_same_losses(tmp_path / "straight", tmp_path / "killed")
    for a, b in zip(metrics(tmp_path / "straight"), metrics(tmp_path / "killed")):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    state = torch.load(tmp_path / "straight" / "checkpoints" / "step-000004" / "trainer_state.pt",
                       weights_only=False)
    groups = state["optimizer"]["param_groups"]
    assert all(not g["train_mode"] for g in groups) and groups[0]["warmup_steps"] == 1
    assert all("z" in s for s in state["optimizer"]["state"].values())
    # The saved weights are the evaluation weights x: switching to train mode (y) and back to
    # eval reproduces them, and y differs.
    from schedulefree import AdamWScheduleFree
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "model")
    saved = [p.detach().clone() for p in model.parameters()]
    optimizer = AdamWScheduleFree([{"params": [p for p in model.parameters() if p.ndim >= 2]},
                                   {"params": [p for p in model.parameters() if p.ndim < 2]}])
    optimizer.load_state_dict(state["optimizer"])
    optimizer.train()
    assert any(not torch.allclose(p, s) for p, s in zip(model.parameters(), saved))
    optimizer.eval()
    for p, s in zip(model.parameters(), saved):
        torch.testing.assert_close(p, s, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_student_matches_eager(tokenizer_dir, data_file, tmp_path):
    """train.compile: two steps on CPU whose losses equal eager within 1e-5 (relative)."""
    common = ["train.max_steps=2", "train.cpu_threads=1", "train.save_checkpoints=false"]
    train(tiny_config(tokenizer_dir, data_file, *common), tmp_path / "eager")
    from torch._dynamo.utils import counters

    counters.clear()
    train(tiny_config(tokenizer_dir, data_file, *common, "train.compile=true"), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1  # the layers really ran compiled
    assert_same_losses(tmp_path / "compiled", tmp_path / "eager", rel=1e-5)


def test_scale_out_settings_are_checked_at_load():
    base = ["model.student_init={model_type: llama}", "loss.kd_ratio=0"]
    for overrides, message in [
        (["train.optimizer=adamw_schedulefree", "train.schedule=one_cycle"], "one_cycle"),
        (["train.optimizer=adamw_schedulefree", "train.min_lr_ratio=0.1"], "min_lr_ratio"),
        (["model.lora.target_modules=[q_proj, lm_head]"], "lm_head"),
        (["model.lora.rank=0"], "model.lora.rank"),
        (["data.packing=true", "loss.reduction=sequence"], "reduction"),
    ]:
        with pytest.raises(EssenceError, match=message):
            load_config(None, base + overrides)
    config = load_config(None, base + ["model.lora={}"])
    assert config.model.lora.rank == 16 and config.model.lora.alpha is None
    assert config.model.lora.target_modules == ("q_proj", "v_proj")


def test_deepspeed_launch_on_cpu_is_refused_and_engines_are_named(tokenizer_dir, data_file, tmp_path,
                                                                 monkeypatch):
    """accelerate trains a DeepSpeed launch on CPU with DDP without a word: refused instead."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(EssenceError, match="DeepSpeed launch .* on CPU.*fsdp2.yaml"):
        train(tiny_config(tokenizer_dir, data_file, "train.max_steps=1"), tmp_path / "ds")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert train(tiny_config(tokenizer_dir, data_file, "train.max_steps=1"), tmp_path / "one")["engine"] == "single"
