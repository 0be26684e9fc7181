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
from typing import Any, Literal

from essence.data.pipeline import DataConfig
from essence.data.render import DEFAULT_INSTRUCTION
from essence.errors import EssenceError
from essence.fields import bounded, check_value
from essence.loss.divergences import Divergence


@dataclass(frozen=True)
class SamplingConfig:
    """Training on sampled text: which kind, how often, and how it is generated."""

    method: Literal["none", "on_policy", "sequence_level", "lead_then_student"] = "none"
    """none: the dataset's traces only. on_policy: the student writes the response, the teacher
    scores it (KD). sequence_level: the teacher writes it. lead_then_student: the lead span
    teacher-forced, then the student continues from the cut and the teacher scores that."""
    fraction: float = bounded(1.0, ge=0, le=1)
    """Probability that an optimizer step is sampled (one seeded draw per step, the same on every
    process; the reference's sample_fraction, TRL GKD's λ). 0 trains exactly as method none."""
    max_new_tokens: int = bounded(256, ge=1)
    """Tokens generated per sequence at most (generation stops earlier at the end of the turn)."""
    temperature: float = bounded(0.8, ge=0)
    """Sampling temperature (the reference's 0.8); 0 is greedy."""
    top_p: float = bounded(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1.0: off)."""
    top_k: int = bounded(0, ge=0)
    """Top-k sampling (0: off; transformers' own default of 50 would silently truncate)."""
    include_prompt_loss: bool = False
    """on_policy / sequence_level: also put the KD term on the prompt's tokens, as the reference's
    option of the same name."""
    nll_on: Literal["data", "sample"] = "data"
    """on_policy / sequence_level: data keeps the NLL term on the dataset's (truncated) trace, as
    the reference does; sample puts it on the teacher's generated text (sequence_level only)."""
    divergence: Divergence = "reverse_kl"
    """lead_then_student: the divergence of the continuation term (at loss.temperature)."""
    params: dict[str, float] = field(default_factory=dict)
    """Parameters of that divergence, as loss.params (e.g. beta for js)."""
    continuation_weight: float = bounded(0.5, gt=0)
    """lead_then_student: weight of the continuation term, a mean over the step's continuation
    tokens: loss = (1-λ)·NLL + λ·KD + continuation_weight·KD_continuation."""
    seed: int = 0
    """Seed of the per-step draw and of generation."""

    @property
    def active(self) -> bool:
        return self.method != "none" and self.fraction > 0


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters on the student (peft): only the adapters train. Defaults as the
    paper's reference code: rank 16, q_proj and v_proj, alpha = 2 × rank, no dropout."""

    rank: int = bounded(16, ge=1)
    """r: the adapters' rank."""
    alpha: float | None = bounded(None, gt=0)
    """Scale numerator (the update is alpha/r · B·A); None: 2 × rank, as the reference."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Names of the linear layers that get adapters (the LM head and embeddings cannot: the
    fused loss reads the head's weight directly)."""
    dropout: float = bounded(0.0, ge=0, lt=1)
    """Dropout on the adapters' input."""


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
    teacher_cache: str | None = None
    """Read the teacher's targets from this cache (essence teacher cache CONFIG --out DIR), or
    from DIR/<fingerprint> as essence sweep builds them; the teacher is then never loaded or run."""
    teacher_cache_k: int = bounded(64, ge=1)
    """Top-k ids per position kept in (and read from) the cache; a cache built with a larger k
    serves a smaller one exactly. Sampled mode: tokens drawn per position (≤ 255)."""
    teacher_cache_mode: Literal["topk", "sampled"] = "topk"
    """topk: top-k + tail bucket, every divergence; sampled: tokens drawn from the teacher, an
    unbiased estimate of forward KL only (see essence.loss.sparse_kd)."""
    teacher_cache_dtype: Literal["float16", "float32"] = "float16"
    """Storage of the cached log-probabilities (float32: exact, twice the bytes)."""
    teacher_context: Literal["full", "kept"] = "kept"
    """What the teacher saw for truncations that are not a lead span (window middle/right,
    cot_lead): kept = only the kept tokens (online teacher); full = the whole sequence (a cache,
    built once over whole sequences). Lead spans are the same either way."""
    gradient_checkpointing: bool = False
    """Recompute student activations in backward to save memory."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of every weight (`lora: {}` for the defaults); checkpoints
    hold the merged model (for eval) and the adapter (adapter/), None: full fine-tuning."""


@dataclass(frozen=True)
class LossConfig:
    """The training objective (1-λ)·NLL + λ·KD."""

    kd_ratio: float = bounded(0.5, ge=0, le=1)
    """λ: weight of the KD term (the paper uses 0.5); 0 is plain supervised fine-tuning."""
    divergence: Divergence = "forward_kl"
    """The KD divergence (see essence.loss.divergences)."""
    temperature: float = bounded(1.0, gt=0)
    """Softmax temperature τ of both models in the KD term (result scaled by τ²)."""
    params: dict[str, float] = field(default_factory=dict)
    """Divergence parameters: forward_ratio (combined_kl), beta (js), alpha (skew_*),
    log_scale (tvd: true compares log-probabilities, as the reference's option)."""
    reduction: Literal["token", "sequence"] = "token"
    """token: each term is summed over the step's targets and divided by their count (every
    token weighs the same; batch-invariant). sequence: each term is the mean over each
    sequence's own targets, then the mean over the step's sequences that have targets for
    that term, as the reference's per-rank means at micro-batch 1 (every sequence weighs
    the same)."""
    chunk_size: int = bounded(256, ge=1)
    """Tokens per chunk of the fused LM-head + loss (memory is O(chunk × vocab)). At vocab 152k,
    256 keeps the loss's added memory near 1/9 of a naive loss at no time cost on CPU."""


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop, checkpoints and logging."""

    epochs: float = bounded(1.0, gt=0)
    """Passes over the training set (fractional allowed)."""
    max_steps: int | None = bounded(None, ge=1)
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    batch_size: int = bounded(1, ge=1)
    """Sequences per micro-batch per process."""
    grad_accum: int = bounded(1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float = bounded(1e-5, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = bounded(0.0, ge=0)
    """AdamW weight decay."""
    warmup_ratio: float = bounded(0.03, ge=0, le=1)
    """Fraction of the steps spent warming the learning rate up linearly."""
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)
    """Cosine decay ends at lr × this (schedule: cosine)."""
    schedule: Literal["cosine", "one_cycle"] = "cosine"
    """cosine: linear warmup to lr, cosine decay to lr × min_lr_ratio. one_cycle: torch's
    OneCycleLR with its defaults, as the reference uses it (max_lr = lr, pct_start =
    warmup_ratio): from lr/25 up to lr, cosine down to lr/(25·10⁴), and AdamW's β1 cycling
    0.95 → 0.85 → 0.95 against the learning rate (betas[0] is then unused)."""
    betas: tuple[float, ...] = bounded((0.9, 0.95), ge=0, lt=1)
    """AdamW's (β1, β2); the reference uses torch's defaults (0.9, 0.999)."""
    weight_decay_scope: Literal["matrices", "all"] = "matrices"
    """matrices: decay only weight matrices (not biases and norm gains); all: every parameter,
    as the reference does."""
    expect_global_batch: int | None = bounded(None, ge=1)
    """Warn at start when processes × batch_size × grad_accum differs from this (a replication
    config pins the global batch of the recipe it reproduces); None: no check."""
    max_grad_norm: float | None = bounded(1.0, gt=0)
    """Clip the gradient norm to this (None: no clipping)."""
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """bf16 autocast of the student's forward (the loss stays fp32): auto turns it on when a CUDA
    GPU is present. fp16 is not offered: it needs loss scaling, and bf16 is the GPU path."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    log_every: int = bounded(1, ge=1)
    """Write a metrics line every this many optimizer steps."""
    val_every: int | None = bounded(None, ge=1)
    """Validation loss every this many steps (None: only at the end, if there is a val set)."""
    save_every: int | None = bounded(None, ge=1)
    """Checkpoint every this many steps (None: only at the end)."""
    save_checkpoints: bool = True
    """False: write no checkpoint and no final model, only metrics and the summary (benchmarks
    of big models, where a save costs more than the steps measured)."""
    tracker: tuple[Literal["none", "tensorboard", "wandb", "trackio", "mlflow", "aim", "comet_ml",
                           "clearml", "dvclive", "swanlab"], ...] = ("none",)
    """Trackers that get the metrics too, through accelerate (one name or a list, e.g.
    [tensorboard, wandb]); each needs its package (`pip install 'essence[wandb]'`)."""
    tracker_project: str = "essence"
    """The trackers' project (W&B and trackio project, MLflow experiment, TensorBoard folder)."""
    run_name: str | None = None
    """The run's name in the trackers (None: the name of its output folder)."""
    run_group: str | None = None
    """The trackers' group for the run (a sweep or frontier sets its folder's name)."""
    progress: bool = True
    """Show a progress bar."""
    collective_timeout_s: float = bounded(1800.0, gt=0)
    """How long a process waits in a collective (all-reduce, barrier) for the others before the
    run fails; raise it when a checkpoint save on a slow disk takes longer."""
    cpu_threads: int | None = bounded(None, ge=1)
    """torch CPU threads (None: torch's default). Tiny models run fastest on 1."""
    optimizer: Literal["adamw", "adamw_schedulefree"] = "adamw"
    """adamw: torch AdamW with train.schedule. adamw_schedulefree: schedule-free AdamW (the
    `schedulefree` package, pip install 'essence[scale]'), as the reference offers: no learning-rate
    schedule (its own linear warmup over warmup_ratio of the steps, then lr); the weights it
    validates, saves and evaluates are its averaged evaluation weights. Refuses schedule: one_cycle
    and min_lr_ratio > 0, which it would not apply."""
    compile: bool = False
    """torch.compile the student (the fused loss stays eager)."""

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise EssenceError(f"config train.betas={list(self.betas)} must be two numbers "
                               "[β1, β2], e.g. [0.9, 0.999]")


@dataclass(frozen=True)
class EvalConfig:
    """Optional evaluation of the trained student at the end of the run."""

    benches: tuple[str, ...] = ()
    """Benchmarks (math500, aime24, aime25, gsm8k, or a file); empty: no evaluation."""
    n: int = bounded(1, ge=1)
    """Samples per problem."""
    max_new_tokens: int = bounded(1024, ge=1)
    """Generation budget per sample."""
    temperature: float = bounded(0.6, ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = bounded(0.95, gt=0, le=1)
    """Nucleus sampling threshold."""
    limit: int | None = bounded(None, ge=1)
    """Evaluate only the first N problems of each benchmark."""
    batch_size: int = bounded(8, ge=1)
    """Prompts generated together."""
    backend: Literal["hf", "vllm"] = "hf"
    """Generation backend."""
    instruction: str = DEFAULT_INSTRUCTION
    """Appended to each problem in the user turn; empty for none (problems that carry their own)."""
    thinking_budget: int | None = bounded(None, ge=1)
    """Close `</think>` after this many thinking tokens and let the model answer (None: no budget);
    the summary gives the accuracy and thinking tokens with and without it."""
    answer_max_tokens: int = bounded(64, ge=1)
    """With a thinking budget: new tokens allowed for the answer after a forced `</think>`."""


@dataclass(frozen=True)
class Config:
    """One experiment: models, data, objective, loop and evaluation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_YAML_FALSE = ("no", "off", "false", "n")
_YAML_TRUE = ("yes", "on", "true", "y")


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
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans
            spelled = [c for c in typing.get_args(kind)
                       if isinstance(c, str) and c in (_YAML_FALSE if not value else _YAML_TRUE)]
            value = spelled[0] if spelled else value
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
    specs = {f.name: f for f in dataclasses.fields(cls)}
    names = list(specs)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise EssenceError(f"unknown config key {full!r}{hint} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
        check_value(full, kwargs[key], specs[key])
    return cls(**kwargs)


def to_dict(config: Config) -> dict:
    """A plain, YAML-friendly dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))
