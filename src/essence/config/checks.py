"""Checks of a whole config: settings that span several fields (run at load, before any model
is built), and the comparison of a run's saved settings with the ones it is resumed under."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from essence.config.schema import Config, to_dict
from essence.errors import EssenceError


def validate(config: Config) -> None:
    """Checks that span several fields, run at load so no model is built for a doomed run."""
    from essence.loss.divergences import divergence_params

    loss = config.loss
    try:
        divergence_params(loss.divergence, dict(loss.params))
    except ValueError as err:
        raise EssenceError(f"config loss.params={dict(loss.params)}: {err}") from None
    m = config.model
    if not (m.student or m.student_init):
        raise EssenceError("config model.student is empty: set a path or hub id "
                           "(or model.student_init for a random model)")
    _validate_teacher_cache(config)
    _validate_sampling(config)
    _validate_scale_out(config)
    if config.eval.benches and not config.train.save_checkpoints:
        raise EssenceError("config eval.benches evaluates the saved student, but "
                           "train.save_checkpoints=false saves none; drop one of the two")
    if loss.kd_ratio > 0 and not (m.teacher or m.teacher_init or m.teacher_cache):
        raise EssenceError(f"config loss.kd_ratio={loss.kd_ratio} needs a teacher: set "
                           "model.teacher, or loss.kd_ratio=0 for plain fine-tuning")


def _validate_teacher_cache(config: Config) -> None:
    """model.teacher_cache_* and model.teacher_context against the loss and the truncation."""
    m, t = config.model, config.data.truncation
    prefix = t.window is None or t.window_position == "left"
    if t.cot_lead is not None:
        prefix = False
    cached = m.teacher_cache is not None
    if not prefix and cached and m.teacher_context == "kept":
        raise EssenceError(
            f"config data.truncation ({t.label()}) keeps tokens that are not a lead span: a cached "
            "teacher saw the whole sequence, an online one sees only the kept tokens. Set "
            "model.teacher_context: full to train from the cache, or drop model.teacher_cache")
    if not prefix and not cached and m.teacher_context == "full":
        raise EssenceError("config model.teacher_context: full needs model.teacher_cache (the online "
                           "teacher sees only the kept tokens); set it to kept, or set a cache")
    if m.teacher_cache_mode == "sampled":
        if config.loss.divergence != "forward_kl":
            raise EssenceError(f"config model.teacher_cache_mode: sampled estimates forward_kl only, "
                               f"not loss.divergence={config.loss.divergence}; use topk")
        if m.teacher_cache_k > 255:
            raise EssenceError(f"config model.teacher_cache_k={m.teacher_cache_k}: sampled mode "
                               "stores counts in one byte; draw at most 255 tokens per position")


def _validate_scale_out(config: Config) -> None:
    """LoRA, packing and the schedule-free optimizer against the rest of the config."""
    lora, t = config.model.lora, config.train
    if lora is not None:
        if not lora.target_modules:
            raise EssenceError("config model.lora.target_modules is empty; name the layers that get "
                               "adapters, e.g. [q_proj, v_proj]")
        bad = [n for n in lora.target_modules if n in ("lm_head", "embed_tokens")]
        if bad:
            raise EssenceError(f"config model.lora.target_modules names {bad}: the fused loss reads "
                               "the LM head's weight directly, so the head and the embeddings stay "
                               "frozen and unadapted; adapt the body's linear layers only")
    if t.optimizer == "adamw_schedulefree":
        if t.schedule == "one_cycle":
            raise EssenceError("config train.optimizer=adamw_schedulefree has its own schedule; "
                               "train.schedule=one_cycle would fight it — use the default schedule")
        if t.min_lr_ratio > 0:
            raise EssenceError(f"config train.min_lr_ratio={t.min_lr_ratio} sets a cosine decay, "
                               "which train.optimizer=adamw_schedulefree does not use; set it to 0")
    if config.data.packing:
        if config.loss.reduction == "sequence":
            raise EssenceError("config data.packing puts several sequences in one row; "
                               "loss.reduction=sequence averages per row, so use token (or no packing)")
        if config.model.teacher_cache:
            raise EssenceError("config data.packing is not supported with model.teacher_cache (the "
                               "cache serves one sequence per row); drop one of the two")
        if config.sampling.method != "none":
            raise EssenceError(f"config data.packing is not supported with sampling.method="
                               f"{config.sampling.method}; drop one of the two")


def _validate_sampling(config: Config) -> None:
    """The sampling block against the loss, the teacher and the truncation."""
    s, m, t = config.sampling, config.model, config.data.truncation
    if s.method == "none":
        return
    if config.loss.kd_ratio == 0 or m.teacher_cache or not (m.teacher or m.teacher_init):
        raise EssenceError(
            f"config sampling.method={s.method} needs an online teacher to score (or write) the "
            "sampled text: set model.teacher and loss.kd_ratio > 0, without model.teacher_cache "
            "(a cache holds the teacher's outputs for the dataset's traces only)")
    if s.nll_on == "sample" and s.method != "sequence_level":
        raise EssenceError(f"config sampling.nll_on=sample puts the NLL term on the teacher's text; "
                           f"sampling.method={s.method} has none (set sequence_level, or nll_on: data)")
    if s.method != "lead_then_student":
        return
    if config.loss.reduction == "sequence":
        raise EssenceError("config sampling.method=lead_then_student adds a token-mean continuation "
                           "term; loss.reduction=sequence is not supported with it (use token)")
    try:
        from essence.loss.divergences import divergence_params

        divergence_params(s.divergence, dict(s.params))
    except ValueError as err:
        raise EssenceError(f"config sampling.params={dict(s.params)}: {err}") from None
    lead = t.cot_lead is None and (t.window is None or t.window_position == "left")
    cuts = t.lsp < 1 or t.window is not None or t.max_tokens is not None or t.cut_after_think
    if not (lead and cuts):
        raise EssenceError(
            f"config sampling.method=lead_then_student continues each sequence from a lead-span cut, "
            f"but data.truncation ({t.label()}) {'keeps no lead span' if not lead else 'cuts nothing'}; "
            "set data.truncation.lsp < 1 (or a left window, max_tokens, cut_after_think)")


RESUMABLE_KEYS = ("train.max_steps", "train.epochs", "train.log_every", "train.val_every",
                  "train.save_every", "train.save_checkpoints", "train.tracker", "train.progress",
                  "train.tracker_project", "train.run_name", "train.run_group",
                  "train.collective_timeout_s", "eval")
"""Keys that may differ between a run's saved config and a resume of it: when to stop, log,
validate and save, and how to evaluate; nothing that changes what a step computes."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: tree}


def config_changes(saved: dict, config: Config, allowed: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """'key: old → new' for each setting that differs between a saved config (as written by
    save_config) and `config`, leaving out the allowed keys (and their sub-keys). A key the saved
    file lacks (written before the key existed) counts as its default."""
    old, new = _flatten(saved), _flatten(to_dict(config))
    default = _flatten(to_dict(Config()))
    changes = []
    for key in sorted(set(old) | set(new)):
        if any(key == a or key.startswith(a + ".") for a in allowed):
            continue
        before = old.get(key, default.get(key))
        if before != new.get(key):
            changes.append(f"{key}: {before!r} → {new.get(key)!r}")
    return changes


def check_unchanged(saved_path: Path, config: Config, what: str, fix: str) -> None:
    """Refuse to continue `what` (a run or sweep point) under settings other than those it was
    started with (read from saved_path), naming every differing key."""
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise EssenceError(f"{saved_path} is unreadable ({err}); {fix}") from None
    if not isinstance(saved, dict):
        raise EssenceError(f"{saved_path} does not hold a config mapping; {fix}")
    changes = config_changes(saved, config)
    if changes:
        raise EssenceError(f"{what} was started with other settings ({saved_path}): "
                           f"{'; '.join(changes)}. {fix}")
