"""The data flow in one place: read → render → truncate → supervise → examples."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Literal

from essence.data.batching import Example
from essence.data.records import OnError, Record, Skipped, read_records
from essence.data.render import Rendered, render
from essence.data.supervision import SupervisionConfig, supervise
from essence.data.truncation import Kept, TruncationConfig, truncate
from essence.errors import EssenceError
from essence.fields import bounded


@dataclass(frozen=True)
class DataConfig:
    """Where the traces come from and how each becomes a training sequence."""

    source: str = ""
    """A local .jsonl / .json / .parquet file, or a Hugging Face dataset name."""
    config: str | None = None
    """The hub dataset's configuration name, if it has several."""
    split: str = "train"
    """The hub dataset's split."""
    field_map: dict[str, str] = field(default_factory=dict)
    """Column names for other flat layouts: keys id, system, prompt, cot, answer."""
    limit: int | None = bounded(None, ge=1)
    """Train on this many records, chosen (per `selection`) after bad and over-long rows are
    filtered out, as the reference keeps its first 8,000 traces under 4,096 tokens (None: all)."""
    selection: Literal["head", "sample"] = "head"
    """How `limit` chooses: head takes the first records in file order; sample takes a seeded
    uniform sample (in the sampled order) of the records that pass the filters."""
    selection_seed: int = 0
    """Seed of selection: sample."""
    system_prompt: str = "keep"
    """keep: render each record's system prompt; drop: render none, as the reference does (a
    template that adds its own default system text when none is given still adds it); any other
    text replaces every record's system prompt."""
    trailing_generation_prompt: bool = False
    """Replication only: append the template's generation prompt after the assistant turn, as
    the reference renders whole conversations with add_generation_prompt=True (3 more Qwen3
    tokens at the end of each sequence, which then count in n for the LSP cut)."""
    val_fraction: float = bounded(0.0, ge=0, lt=1)
    """Hold out this fraction of the records (at least one) for validation loss."""
    max_length: int | None = bounded(32768, ge=1)
    """Rendered sequences longer than this are bad input (skipped or fatal per on_error);
    None: no limit (one huge row can then exhaust the memory of the whole run)."""
    on_error: OnError = "skip"
    """skip: report bad rows and carry on; fail: stop at the first bad row."""
    chat_template: str | None = None
    """A built-in template name (chatml-think) or a Jinja file; None: the tokenizer's own."""
    truncation: TruncationConfig = field(default_factory=TruncationConfig)
    """How each sequence is cut before training."""
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    """Which segments carry the NLL and the KD loss."""
    packing: bool = False
    """Put each micro-batch's sequences one after another in a single row instead of padding
    them: no padding, position ids restarting at every sequence and attention kept within each
    (a block-diagonal causal mask; flash-attention varlen where installed). The sequences of each
    step, their masks and the loss are unchanged; only the padding goes."""


@dataclass
class Prepared:
    """The examples of a dataset plus what was skipped and what truncation kept."""

    examples: list[Example]
    rendered: list[Rendered]
    kept: list[Kept]
    skipped: list[Skipped]


def segment_ids(rendered: Rendered) -> list[int]:
    """Per-token segment id of a full rendered sequence (1 prompt, 2 cot, 3 answer)."""
    return [rendered.spans.segment_of(i) for i in range(len(rendered.input_ids))]


def to_example(rendered: Rendered, kept: Kept, config: DataConfig) -> Example:
    """Cut one rendered sequence to its kept tokens and attach supervision masks."""
    index = kept.indices()
    all_segments = segment_ids(rendered)
    segments = [all_segments[i] for i in index]
    masks = supervise(rendered.record_id, segments, config.supervision)
    return Example(
        record_id=rendered.record_id,
        input_ids=[rendered.input_ids[i] for i in index],
        segment_ids=segments,
        nll_mask=masks.nll,
        kd_mask=masks.kd,
    )


def with_system_prompt(record: Record, system_prompt: str) -> Record:
    """The record with its system prompt kept, dropped or replaced (data.system_prompt)."""
    if system_prompt == "keep":
        return record
    return dataclasses.replace(record, system=None if system_prompt == "drop" else system_prompt)


def _check_protocol(record: Record, truncation: TruncationConfig) -> None:
    """Refuse CoT-relative truncation on a record that has no chain of thought."""
    if record.cot:
        return
    used = [n for n, on in (("cot_lead", truncation.cot_lead is not None),
                            ("cut_after_think", truncation.cut_after_think)) if on]
    if used:
        raise EssenceError(
            f"record {record.id!r} has no chain of thought (plain instruction data), so "
            f"data.truncation.{used[0]} has nothing to cut; use lsp or window for such data"
        )


def _selection_order(n: int, config: DataConfig) -> list[int]:
    """The order in which records are considered until `limit` of them pass the filters."""
    order = list(range(n))
    if config.selection == "sample" and config.limit is not None:
        random.Random(config.selection_seed).shuffle(order)
    return order


def render_records(
    records: list[Record], tokenizer, config: DataConfig, source: str
) -> tuple[list[Rendered], list[Skipped]]:
    """Render records (in selection order) until `limit` pass; over-long ones are bad input
    handled per on_error, so the limit counts only records that are trained on."""
    from tqdm.auto import tqdm

    rendered, skipped = [], []
    order = _selection_order(len(records), config)
    wanted = len(records) if config.limit is None else min(config.limit, len(records))
    # Real datasets take a while to tokenize; tiny ones should stay quiet.
    progress = tqdm(total=wanted, desc="render", unit="rec", disable=wanted < 2000)
    for index in order:
        if len(rendered) >= wanted:
            break
        record = with_system_prompt(records[index], config.system_prompt)
        _check_protocol(record, config.truncation)
        item = render(record, tokenizer, config.chat_template,
                      trailing_generation_prompt=config.trailing_generation_prompt)
        n = len(item.input_ids)
        if config.max_length is not None and n > config.max_length:
            skip = Skipped(
                source, index, record.id, None,
                f"rendered sequence has {n} tokens, over data.max_length={config.max_length}",
            )
            if config.on_error == "fail":
                raise EssenceError(f"{skip}; raise data.max_length or set data.on_error: skip")
            skipped.append(skip)
            continue
        rendered.append(item)
        progress.update(1)
    progress.close()
    return rendered, skipped


def prepare(config: DataConfig, tokenizer, records: list[Record] | None = None) -> Prepared:
    """Read (unless records are given), render, truncate and supervise a dataset."""
    skipped: list[Skipped] = []
    if records is None:
        if not config.source:
            raise EssenceError("data.source is empty; set it to a data file or dataset name")
        result = read_records(
            config.source, field_map=config.field_map, on_error=config.on_error,
            config=config.config, split=config.split,  # limit applies after the filters
        )
        records, skipped = result.records, result.skipped
        if not records:
            why = (f"all {len(skipped)} rows were skipped, e.g. {skipped[0]}" if skipped
                   else "it holds no rows")
            raise EssenceError(f"no usable records in data.source {config.source}: {why}")
    rendered, too_long = render_records(records, tokenizer, config, config.source)
    kept = [truncate(r.spans, config.truncation, r.record_id) for r in rendered]
    examples = [to_example(r, k, config) for r, k in zip(rendered, kept)]
    return Prepared(examples, rendered, kept, skipped + too_long)
