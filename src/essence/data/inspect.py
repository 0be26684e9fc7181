"""`essence data profile` and `essence data show`: see the data and the saving before training."""

from __future__ import annotations

import math
from dataclasses import replace

from essence.data.pipeline import DataConfig, prepare, segment_ids
from essence.data.render import Rendered
from essence.data.supervision import supervise
from essence.data.truncation import Kept, TruncationConfig, truncate
from essence.errors import EssenceError

SEGMENT_NAMES = ("prompt", "cot", "answer")
SEGMENT_STYLES = {1: "cyan", 2: "yellow", 3: "green"}


def _percentile(values: list[int], q: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def _stats(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0, "total": 0}
    return {
        "mean": sum(values) / len(values),
        "p50": _percentile(values, 50),
        "p90": _percentile(values, 90),
        "max": max(values),
        "total": sum(values),
    }


def _segment_lengths(rendered: list[Rendered]) -> dict[str, list[int]]:
    lengths: dict[str, list[int]] = {name: [] for name in (*SEGMENT_NAMES, "total")}
    for item in rendered:
        for name in SEGMENT_NAMES:
            start, end = getattr(item.spans, name)
            lengths[name].append(end - start)
        lengths["total"].append(len(item.input_ids))
    return lengths


def _kept_fractions(kept: list[Kept], lengths: dict[str, list[int]]) -> dict:
    def fraction(done: int, total: int) -> float:
        return done / total if total else 0.0

    out = {"kept_fraction": fraction(sum(k.total for k in kept), sum(lengths["total"]))}
    for name in SEGMENT_NAMES:
        out[name] = fraction(sum(getattr(k, name) for k in kept), sum(lengths[name]))
    return out


def profile(config: DataConfig, tokenizer, truncations: list[TruncationConfig]) -> dict:
    """Token statistics per segment and the fraction each truncation keeps."""
    prepared = prepare(config, tokenizer)
    lengths = _segment_lengths(prepared.rendered)
    settings = {}
    for setting in truncations:
        kept = [truncate(item.spans, setting, item.record_id) for item in prepared.rendered]
        settings[setting.label()] = _kept_fractions(kept, lengths)
    return {
        "source": config.source,
        "records": len(prepared.rendered),
        "skipped": len(prepared.skipped),
        "skipped_reasons": [str(s) for s in prepared.skipped],
        "segments": {name: _stats(values) for name, values in lengths.items()},
        "truncations": settings,
    }


def print_profile(report: dict, console) -> None:
    """Render a profile report as console tables."""
    from rich.table import Table

    # Messages are never wrapped (soft_wrap: the terminal folds them); only tables fit its width.
    console.print(
        f"[bold]{report['source']}[/]: {report['records']} records read, "
        f"{report['skipped']} skipped", soft_wrap=True
    )
    for reason in report["skipped_reasons"][:5]:
        console.print(f"  skipped: {reason}", soft_wrap=True)
    if report["skipped"] > 5:
        console.print(f"  … and {report['skipped'] - 5} more", soft_wrap=True)
    table = Table(title="tokens per record")
    for column in ("segment", "mean", "p50", "p90", "max", "total"):
        table.add_column(column, justify="right" if column != "segment" else "left")
    for name, s in report["segments"].items():
        table.add_row(name, f"{s['mean']:.1f}", f"{s['p50']:.0f}", f"{s['p90']:.0f}",
                      str(s["max"]), str(s["total"]))
    console.print(table)
    if report["truncations"]:
        kept = Table(title="fraction of tokens kept (student compute scales with 'total')")
        for column in ("truncation", "prompt", "cot", "answer", "total"):
            kept.add_column(column, justify="right" if column != "truncation" else "left")
        for label, f in report["truncations"].items():
            kept.add_row(label, *(f"{f[n]:.1%}" for n in SEGMENT_NAMES),
                         f"{f['kept_fraction']:.1%}")
        console.print(kept)


def show(config: DataConfig, tokenizer, index: int, console) -> None:
    """Print one rendered example: colour = segment, underline = supervised, ✂ = cut."""
    from rich.text import Text

    prepared = prepare(config, tokenizer)
    if not 0 <= index < len(prepared.rendered):
        raise EssenceError(
            f"--index {index} is out of range: {config.source} has "
            f"{len(prepared.rendered)} valid records (0..{len(prepared.rendered) - 1})"
        )
    item = prepared.rendered[index]
    kept = truncate(item.spans, config.truncation, item.record_id)
    keep = set(kept.indices())
    segments = segment_ids(item)
    masks = supervise(item.record_id, segments, replace(config.supervision, random_drop=0.0))
    text = Text()
    for i, token in enumerate(item.input_ids):
        if i > 0 and (i in keep) != (i - 1 in keep):
            text.append(" ✂ ", style="bold red")
        piece = tokenizer.decode([token])
        style = SEGMENT_STYLES[segments[i]]
        if i not in keep:
            style = "dim strike"
        elif masks.nll[i] or masks.kd[i]:
            style += " underline"
        text.append(piece, style=style)
    console.print(f"[bold]record {item.record_id}[/] ({len(item.input_ids)} tokens; "
                  f"{config.truncation.label()} keeps {kept.total}: prompt {kept.prompt}, "
                  f"cot {kept.cot}, answer {kept.answer})", soft_wrap=True)
    console.print("legend: [cyan]prompt[/] [yellow]cot[/] [green]answer[/] "
                  "[underline]supervised[/] [dim strike]cut[/] [bold red]✂[/] cut point",
                  soft_wrap=True)
    console.print(text, soft_wrap=True)  # the record's own lines, as the tokenizer decodes them
