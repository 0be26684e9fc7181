"""Load tokenizers and causal LMs from hub ids, local paths or the shipped demo models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from essence.errors import EssenceError
from essence.paths import looks_local, resolve


def load_tokenizer(spec: str):
    """A fast tokenizer from a hub id, a local folder or an essence: asset."""
    from transformers import AutoTokenizer

    path = resolve(spec)
    if looks_local(path) and not Path(path).expanduser().exists():
        raise EssenceError(f"tokenizer path {spec} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise EssenceError(
            f"cannot load a tokenizer from {spec!r}: {err}".split("\n")[0]
            + " — pass a local folder with tokenizer files or a hub id"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(spec: str, *, dtype=None, role: str = "model", flag: str | None = None):
    """A pretrained causal LM from a hub id, local folder or essence: asset.

    role names the model in messages; flag is the option the user set (default model.<role>).
    """
    flag = flag or f"model.{role}"
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = resolve(spec)
    if looks_local(path) and not Path(path).expanduser().exists():
        raise EssenceError(f"{role} path {spec} does not exist; check {flag}")
    _check_saved_files(Path(path).expanduser(), role, spec)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, EOFError, SafetensorError, RuntimeError) as err:
        # torch.load reports a truncated .bin as RuntimeError; anything else is a bug to show.
        if isinstance(err, RuntimeError) and "PytorchStreamReader" not in str(err):
            raise
        first = str(err).split("\n")[0]
        raise EssenceError(
            f"cannot load the {role} from {spec!r}: {first} — check {flag} "
            "(a local folder with config.json and complete weights, or a hub id)"
        ) from None


def _check_saved_files(folder: Path, role: str, spec: str) -> None:
    """A folder essence wrote carries a manifest: refuse truncated or missing weight files."""
    from essence.models.manifest import MANIFEST, verify

    if (folder / MANIFEST).is_file():
        problem = verify(folder)
        if problem:
            raise EssenceError(f"the {role} in {spec} is damaged: {problem}; use an intact "
                               "copy or another checkpoint")


def random_causal_lm(fields: dict[str, Any], vocab_size: int, seed: int, *, dtype=None,
                     device=None):
    """A random-init causal LM from transformers config fields (model_type is required), built
    directly on `device` (default CPU): a GPU initialises billions of weights in seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise EssenceError("a random-init model config needs model_type (e.g. qwen2 or llama)")
    fields.setdefault("vocab_size", vocab_size)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError) as err:
        raise EssenceError(f"bad random-init model config {fields}: {err}") from None
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype) if dtype is not None else model
