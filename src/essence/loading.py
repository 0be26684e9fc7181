"""Load tokenizers and causal LMs from hub ids, local paths or the shipped demo models."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from essence.errors import EssenceError

ASSET_PREFIX = "essence:"


def resolve(spec: str) -> str:
    """Map 'essence:demo/teacher' (or essence:demo.yaml) to the shipped asset; pass others through."""
    if spec.startswith(ASSET_PREFIX):
        path = Path(str(resources.files("essence").joinpath("assets", spec[len(ASSET_PREFIX):])))
        if not path.exists():
            raise EssenceError(f"{spec!r} is not an asset shipped with essence (no {path})")
        return str(path)
    return spec


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).exists() or spec.count("/") > 1


def load_tokenizer(spec: str):
    """A fast tokenizer from a hub id, a local folder or an essence: asset."""
    from transformers import AutoTokenizer

    path = resolve(spec)
    if _looks_local(path) and not Path(path).expanduser().exists():
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
    from transformers import AutoModelForCausalLM

    path = resolve(spec)
    if _looks_local(path) and not Path(path).expanduser().exists():
        raise EssenceError(f"{role} path {spec} does not exist; check {flag}")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        first = str(err).split("\n")[0]
        raise EssenceError(
            f"cannot load the {role} from {spec!r}: {first} — check {flag} "
            "(a local folder with config.json and weights, or a hub id)"
        ) from None


def random_causal_lm(fields: dict[str, Any], vocab_size: int, seed: int, *, dtype=None):
    """A random-init causal LM from transformers config fields (model_type is required)."""
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
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype) if dtype is not None else model
