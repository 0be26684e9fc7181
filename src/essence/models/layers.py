"""Smaller students from a pretrained model: keep every k-th decoder layer, then save."""

from __future__ import annotations

import copy
from pathlib import Path

from essence.errors import EssenceError

# Per-layer config lists that must shrink with the layers (Qwen2/Qwen3 `layer_types`, ...).
PER_LAYER_CONFIG_FIELDS = ("layer_types", "mlp_layer_types", "no_rope_layers")


def kept_layers(num_layers: int, keep_every: int, *, keep_last: bool = True) -> list[int]:
    """Indices of the decoder layers `drop_layers` keeps: 0, k, 2k, ... (and the last one)."""
    if not isinstance(keep_every, int) or keep_every < 1:
        raise EssenceError(f"keep_every must be a positive integer, got {keep_every!r}")
    kept = list(range(0, num_layers, keep_every))
    if keep_last and num_layers and kept[-1] != num_layers - 1:
        kept.append(num_layers - 1)
    return kept


def drop_layers(model, keep_every: int, *, keep_last: bool = True):
    """A new, smaller causal LM initialized from `model` by keeping every k-th decoder layer.

    Works for Llama/Qwen2/Qwen3-style models (`model.model.layers`). The student has the same
    class, a config with fewer `num_hidden_layers` (per-layer lists such as `layer_types`
    shortened to match), the kept layers' weights, and copies of the embeddings, final norm and
    lm_head. Layers are renumbered 0..n-1 (their `layer_idx` addresses the KV cache). The
    source model is left untouched and shares no storage with the student.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise EssenceError(
            f"drop_layers needs a Llama/Qwen-style model with `model.model.layers`; "
            f"{type(model).__name__} has none"
        )
    old_n = model.config.num_hidden_layers
    assert len(layers) == old_n, f"config says {old_n} layers, the model has {len(layers)}"
    kept = kept_layers(old_n, keep_every, keep_last=keep_last)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    for field in PER_LAYER_CONFIG_FIELDS:
        values = getattr(config, field, None)
        if isinstance(values, (list, tuple)) and len(values) == old_n:
            setattr(config, field, [values[i] for i in kept])
    student = type(model)(config).to(device=model.device, dtype=model.dtype)
    student.load_state_dict(_renumbered_state_dict(model.state_dict(), kept), strict=True)
    student.generation_config = copy.deepcopy(model.generation_config)
    student.train(model.training)
    return student


def _renumbered_state_dict(state: dict, kept: list[int]) -> dict:
    """Keep the tensors of layers in `kept`, renamed `model.layers.<new index>.*`; all else as is."""
    new_index = {old: new for new, old in enumerate(kept)}
    prefix = "model.layers."
    out = {}
    for key, tensor in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) not in new_index:
                continue
            key = f"{prefix}{new_index[int(index)]}.{rest}"
        out[key] = tensor
    return out


def save_student(model, tokenizer, out_dir: Path) -> Path:
    """Save a model and its tokenizer as one Hugging Face directory (safetensors, chat template)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
