"""LoRA adapters on the student (peft): wrap, save as adapter and as a merged model, resume.

Only the adapters train; the base weights, the embeddings and the LM head stay frozen (the fused
loss reads the head's weight directly, so the head never carries an adapter). A checkpoint holds
the merged model at its top level — an ordinary Hugging Face model that `essence eval` and any
other tool read — and the adapter alone in ``adapter/``. Resuming rebuilds the base from
model.student (or model.student_init) and loads the adapter, so the base weights are bit-for-bit
the ones training started from, never a merge that was un-merged again.
"""

from __future__ import annotations

from pathlib import Path

import torch

from essence.errors import EssenceError

ADAPTER_DIR = "adapter"


def _require_peft():
    try:
        import peft
    except ImportError:
        raise EssenceError("model.lora needs the `peft` package: pip install 'essence[scale]' "
                           "(or pip install peft)") from None
    return peft


def apply_lora(student: torch.nn.Module, settings, checkpoint: Path | None = None):
    """The student wrapped in LoRA adapters (a peft model); a checkpoint's adapter when resuming.

    settings: essence.config.schema.LoraSettings. Only the adapter parameters require gradients.
    """
    peft = _require_peft()
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else 2 * settings.rank,
        target_modules=list(settings.target_modules), lora_dropout=settings.dropout,
        bias="none", task_type="CAUSAL_LM",
    )
    try:
        model = peft.get_peft_model(student, config)
    except ValueError as err:
        raise EssenceError(f"config model.lora.target_modules={list(settings.target_modules)}: "
                           f"{str(err).splitlines()[0]}") from None
    if checkpoint is not None:
        adapter = Path(checkpoint) / ADAPTER_DIR
        if not adapter.is_dir():
            raise EssenceError(f"checkpoint {checkpoint} has no {ADAPTER_DIR}/ folder: it was not "
                               "written by a LoRA run; resume it without model.lora")
        peft.set_peft_model_state_dict(model, _read_adapter(adapter))
    return model


def _read_adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in (W + alpha/r · B·A), computed
    out of place: the training model is not touched."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter).detach()
                deltas[f"{name}.weight"] = deltas.get(f"{name}.weight", 0) + delta
    merged = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        value = value.detach()
        if plain in deltas:
            value = value + deltas[plain].to(value.dtype)
        merged[plain] = value
    return merged


def save_lora(model, tmp: Path, state_dict: dict | None = None) -> None:
    """Write the merged model (top level) and the adapter (adapter/) into the folder tmp.

    state_dict: the peft model's full state dict when it was gathered from shards (FSDP2)."""
    base = model.get_base_model()
    merged = merged_state_dict(model) if state_dict is None else None
    if state_dict is not None:  # gathered under FSDP2: fold the adapters in from the full dict
        merged = _merge_gathered(model, state_dict)
    base.save_pretrained(tmp, state_dict=merged, safe_serialization=True)
    model.save_pretrained(tmp / ADAPTER_DIR, state_dict=_adapter_part(model, state_dict))


def _adapter_part(model, state_dict: dict | None):
    if state_dict is None:
        return None  # peft picks the adapter weights itself
    return {k: v for k, v in state_dict.items() if ".lora_" in k}


def _merge_gathered(model, state_dict: dict) -> dict[str, torch.Tensor]:
    """merged_state_dict for a full state dict gathered from FSDP2 shards (keys as model's)."""
    peft_config = model.peft_config[model.active_adapter]
    scale = peft_config.lora_alpha / peft_config.r
    prefix = "base_model.model."
    merged = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        plain = key[len(prefix):] if key.startswith(prefix) else key
        if ".base_layer." in plain:
            stem = key.replace(".base_layer.weight", "")
            a = state_dict.get(f"{stem}.lora_A.{model.active_adapter}.weight")
            b = state_dict.get(f"{stem}.lora_B.{model.active_adapter}.weight")
            plain = plain.replace(".base_layer.", ".")
            if a is not None and b is not None and plain.endswith(".weight"):
                value = value + (scale * (b.float() @ a.float())).to(value.dtype)
        merged[plain] = value
    return merged
