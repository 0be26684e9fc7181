"""Build what the loop needs from a config: accelerator, models, optimizer and schedule, the
validation split, and the checks of what a run reads before its models load."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from essence.config.schema import Config, TrainConfig
from essence.data.batching import Example
from essence.data.pipeline import to_example
from essence.data.truncation import TruncationConfig, truncate
from essence.errors import EssenceError
from essence.models.flops import FlopModel, flop_model
from essence.models.loading import load_causal_lm, load_tokenizer, random_causal_lm
from essence.models.runtime import DTYPES
from essence.paths import resolve
from essence.teacher.sources import CachedTeacher, OnlineTeacher, check_vocabularies
from essence.train.lora import apply_lora


@dataclass
class Models:
    """The student being trained, the frozen teacher (or None), and their shared tokenizer."""

    student: torch.nn.Module
    teacher: OnlineTeacher | CachedTeacher | None
    tokenizer: object
    student_flops: FlopModel
    teacher_flops: FlopModel | None
    teacher_cached: bool = False
    """The teacher's targets come from a cache: its FLOPs are counted as saved, not spent."""


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile every decoder layer (regional compilation: one graph, reused by all layers,
    so compile time does not grow with depth); the fused loss stays eager."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise EssenceError(f"train.compile: {type(model).__name__} names no decoder-layer classes "
                           "(_no_split_modules) to compile")
    for layer in layers:
        layer.compile(dynamic=True)  # lengths vary every step: one graph for all of them


def _check_width(model, vocab: int, role: str) -> None:
    width = model.get_output_embeddings().weight.shape[0]
    if width < vocab:
        raise EssenceError(
            f"the {role}'s logit width ({width}) is smaller than the tokenizer ({vocab} tokens); "
            f"model.{role} and model.tokenizer do not belong together"
        )


def _own_tokenizer(spec: str):
    """The tokenizer shipped beside a model's weights, or None when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(spec))
    except (OSError, ValueError):
        return None  # weights without tokenizer files: nothing to compare against


def build_models(config: Config, device: torch.device, checkpoint: Path | None) -> Models:
    """Load (or randomly initialise) student and teacher; resume the student from a checkpoint."""
    m = config.model
    tok_spec = m.tokenizer or m.student
    if not tok_spec:
        raise EssenceError("set model.tokenizer (or model.student) so the data can be tokenized")
    tokenizer = load_tokenizer(tok_spec)
    vocab = len(tokenizer)
    student_dtype = DTYPES.get(m.dtype, torch.float32)
    if checkpoint is not None and m.lora is None:  # LoRA resumes its adapter on the base below
        student = load_causal_lm(str(checkpoint), dtype=student_dtype, role="student")
    elif m.student_init is not None:
        student = random_causal_lm(m.student_init, vocab, config.train.seed, dtype=student_dtype,
                                   device=device)
    elif m.student:
        if m.tokenizer:  # the student's own tokenizer, if it ships one, must be the one we use
            check_vocabularies(tokenizer, _own_tokenizer(m.student), m.student, role="student")
        student = load_causal_lm(m.student, dtype=student_dtype, role="student")
    else:
        raise EssenceError("set model.student (a path or hub id) or model.student_init")
    _check_width(student, vocab, "student")
    if m.gradient_checkpointing:
        if hasattr(student, "activation_checkpointing_enable"):  # the newer transformers name
            student.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False
    if m.lora is not None:  # only the adapters train; a resumed run reloads its adapter
        student = apply_lora(student, m.lora, checkpoint)
    if config.train.compile:  # each decoder layer, in place: names and state dict stay as they are
        compile_layers(student)
    teacher = teacher_flops = None
    if config.loss.kd_ratio > 0 and m.teacher_cache:  # targets read from disk, no teacher loaded
        return Models(student, CachedTeacher(config, device), tokenizer, flop_model(student, vocab),
                      None, teacher_cached=True)
    # Plain fine-tuning (kd_ratio 0) never loads or runs a teacher, so none is charged.
    if config.loss.kd_ratio > 0 and (m.teacher or m.teacher_init):
        teacher_dtype = DTYPES.get(m.teacher_dtype) or (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        if m.teacher_init is not None:
            model = random_causal_lm(m.teacher_init, vocab, config.train.seed + 1, dtype=teacher_dtype,
                                     device=device)
        else:
            check_vocabularies(tokenizer, _own_tokenizer(m.teacher), m.teacher, role="teacher")
            model = load_causal_lm(m.teacher, dtype=teacher_dtype, role="teacher")
        _check_width(model, vocab, "teacher")
        teacher, teacher_flops = OnlineTeacher(model, device), flop_model(model, vocab)
    elif config.loss.kd_ratio > 0:
        raise EssenceError(
            f"loss.kd_ratio={config.loss.kd_ratio} needs a teacher: set model.teacher, "
            "or loss.kd_ratio=0 for plain fine-tuning"
        )
    return Models(student, teacher, tokenizer, flop_model(student, vocab), teacher_flops)


def build_optimizer(model: torch.nn.Module, config: TrainConfig, total_steps: int):
    """AdamW and its learning-rate schedule (train.schedule: cosine or one_cycle)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.weight_decay_scope == "all":
        groups = [{"params": trainable, "weight_decay": config.weight_decay}]
    else:
        groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    if config.optimizer == "adamw_schedulefree":
        return _schedule_free(groups, config, total_steps)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
    if config.schedule == "one_cycle":
        return optimizer, _one_cycle(optimizer, config, total_steps)
    warmup = math.ceil(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _schedule_free(groups: list[dict], config: TrainConfig, total_steps: int):
    """Schedule-free AdamW (the schedulefree package) with its own warmup, as the reference sets
    it up (warmup_steps = int(steps × warmup_ratio)); the schedule object is a constant factor 1."""
    try:
        from schedulefree import AdamWScheduleFree
    except ImportError:
        raise EssenceError("train.optimizer=adamw_schedulefree needs the `schedulefree` package: "
                           "pip install 'essence[scale]' (or pip install schedulefree)") from None
    optimizer = AdamWScheduleFree(groups, lr=config.lr, betas=tuple(config.betas),
                                  warmup_steps=int(total_steps * config.warmup_ratio))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _one_cycle(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """torch's OneCycleLR with its defaults, as the paper's reference code configures it."""
    # OneCycleLR divides by zero when its warmup phase is exactly one step long, and on the
    # step after the last when warmup is the whole run.
    if math.isclose(config.warmup_ratio * total_steps, 1.0) or config.warmup_ratio == 1.0:
        raise EssenceError(
            f"train.schedule=one_cycle with train.warmup_ratio={config.warmup_ratio} over "
            f"{total_steps} steps makes torch's OneCycleLR divide by zero (a one-step or "
            "whole-run warmup); choose another warmup_ratio"
        )
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps,
                                               pct_start=config.warmup_ratio)


def split_validation(prepared, config: Config) -> tuple[list[Example], list[Example]]:
    """Hold out records for validation; validation sequences are NOT truncated.

    Validation measures every run on the same whole sequences, so runs trained at different
    truncation settings are comparable on one number.
    """
    n = len(prepared.examples)
    fraction = config.data.val_fraction
    n_val = 0 if fraction <= 0 else max(1, round(n * fraction))
    if n_val >= n:
        raise EssenceError(f"data.val_fraction={fraction} leaves no training records out of {n}")
    order = list(range(n))
    random.Random(config.train.seed).shuffle(order)
    val_idx, train_idx = set(order[:n_val]), order[n_val:]
    full = TruncationConfig()
    val = [to_example(r, truncate(r.spans, full), config.data)
           for i, r in enumerate(prepared.rendered) if i in val_idx]
    return [prepared.examples[i] for i in sorted(train_idx)], val


def warn_global_batch(train: TrainConfig, world: int) -> str | None:
    """Print (and return) a warning when the global batch is not the one the config expects."""
    expected = train.expect_global_batch
    actual = world * train.batch_size * train.grad_accum
    if expected is None or actual == expected:
        return None
    message = (f"essence: warning: {world} processes × train.batch_size {train.batch_size} × "
               f"train.grad_accum {train.grad_accum} = {actual} sequences per step, but this "
               f"config expects {expected} (train.expect_global_batch); the recipe it reproduces "
               "is not being followed")
    print(message)
    return message


def check_inputs(config: Config) -> None:
    """Everything a run reads after training, checked before the models load."""
    from essence.data.readers import read_rows
    from essence.eval.benchmarks import BENCHMARKS, load_benchmark
    from essence.paths import looks_local

    if config.data.source and looks_local(config.data.source):
        read_rows(config.data.source)  # a missing, binary or unknown-format file fails here
    for bench in config.eval.benches:
        if bench.strip().lower() not in BENCHMARKS:  # a local file: read it now
            load_benchmark(bench, limit=config.eval.limit)
