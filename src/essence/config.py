"""Experiment configuration: dataclasses with a docstring per field, YAML + dotted overrides.

``load_config("configs/tiny.yaml", ["train.lr=1e-4", "data.truncation.lsp=0.5"])`` reads
the file, applies the overrides (values parsed as YAML scalars), rejects unknown keys with
the closest valid name, and checks each value against its field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from essence.data.pipeline import DataConfig
from essence.errors import EssenceError
from essence.eval.prompting import DEFAULT_INSTRUCTION
from essence.losses import Divergence


@dataclass(frozen=True)
class ModelConfig:
    """The student, the teacher and the tokenizer they share."""

    student: str = ""
    """Student weights: a hub id, a local path or essence:demo/student (shipped)."""
    student_init: dict[str, Any] | None = None
    """Build a random-init student from these transformers config fields instead (tests)."""
    teacher: str | None = None
    """Teacher weights (hub id / path / essence:...); None trains with NLL only."""
    teacher_init: dict[str, Any] | None = None
    """Build a random-init teacher from these config fields instead (tests)."""
    tokenizer: str | None = None
    """Tokenizer path or id; None uses the student's."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Student weight dtype: auto is float32 (bf16 autocast does the GPU speed-up)."""
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Teacher weight dtype: auto is bfloat16 on GPU, float32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute student activations in backward to save memory."""


@dataclass(frozen=True)
class LossConfig:
    """The training objective (1-λ)·NLL + λ·KD."""

    kd_ratio: float = 0.5
    """λ: weight of the KD term (the paper uses 0.5); 0 is plain supervised fine-tuning."""
    divergence: Divergence = "forward_kl"
    """The KD divergence (see essence.losses)."""
    temperature: float = 1.0
    """Softmax temperature τ of both models in the KD term (result scaled by τ²)."""
    params: dict[str, float] = field(default_factory=dict)
    """Divergence parameters: forward_ratio (combined_kl), beta (js), alpha (skew_*)."""
    chunk_size: int = 256
    """Tokens per chunk of the fused LM-head + loss (memory is O(chunk × vocab)). At vocab 152k,
    256 keeps the loss's added memory near 1/9 of a naive loss at no time cost on CPU."""


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop, checkpoints and logging."""

    epochs: float = 1.0
    """Passes over the training set (fractional allowed)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    batch_size: int = 1
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up linearly."""
    min_lr_ratio: float = 0.0
    """Cosine decay ends at lr × this."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (None: no clipping)."""
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """bf16 autocast: auto turns it on when a CUDA GPU is present."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    log_every: int = 1
    """Write a metrics line every this many optimizer steps."""
    val_every: int | None = None
    """Validation loss every this many steps (None: only at the end, if there is a val set)."""
    save_every: int | None = None
    """Checkpoint every this many steps (None: only at the end)."""
    tracker: Literal["none", "tensorboard", "wandb"] = "none"
    """Also log to TensorBoard or W&B (when installed)."""
    progress: bool = True
    """Show a progress bar."""
    cpu_threads: int | None = None
    """torch CPU threads (None: torch's default). Tiny models run fastest on 1."""


@dataclass(frozen=True)
class EvalConfig:
    """Optional evaluation of the trained student at the end of the run."""

    benches: tuple[str, ...] = ()
    """Benchmarks (math500, aime24, aime25, gsm8k, or a file); empty: no evaluation."""
    n: int = 1
    """Samples per problem."""
    max_new_tokens: int = 1024
    """Generation budget per sample."""
    temperature: float = 0.6
    """Sampling temperature (0: greedy)."""
    top_p: float = 0.95
    """Nucleus sampling threshold."""
    limit: int | None = None
    """Evaluate only the first N problems of each benchmark."""
    batch_size: int = 8
    """Prompts generated together."""
    backend: Literal["hf", "vllm"] = "hf"
    """Generation backend."""
    instruction: str = DEFAULT_INSTRUCTION
    """Appended to each problem in the user turn; empty for none (problems that carry their own)."""


@dataclass(frozen=True)
class Config:
    """One experiment: models, data, objective, loop and evaluation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``kind``; convert lists to tuples, ints to floats."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except EssenceError as err:
                errors.append(str(err))
        raise EssenceError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(kind):
            choices = ", ".join(str(c) for c in typing.get_args(kind))
            raise EssenceError(f"config {key}={value!r} is not one of: {choices}")
        return value
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise EssenceError(f"config {key} must be a list, got {value!r}")
        item = typing.get_args(kind)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise EssenceError(f"config {key} must be a mapping, got {value!r}")
        return dict(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if kind is Any or (isinstance(kind, type) and isinstance(value, kind)):
        if kind is int and isinstance(value, bool):
            raise EssenceError(f"config {key} must be an integer, got {value!r}")
        return value
    raise EssenceError(f"config {key} must be {_type_name(kind)}, got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EssenceError(f"config {prefix or 'root'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise EssenceError(f"unknown config key {full!r}{hint} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' → ('a.b', value parsed as a YAML scalar or list)."""
    if "=" not in text:
        raise EssenceError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML experiment file (or defaults when None) and apply dotted overrides."""
    tree: dict = {}
    if path is not None:
        from essence.loading import resolve

        path = Path(resolve(str(path)))
        if not path.is_file():
            raise EssenceError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise EssenceError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise EssenceError(f"config file {path} must hold a mapping at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")


def to_dict(config: Config) -> dict:
    """A plain, YAML-friendly dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from essence.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))
