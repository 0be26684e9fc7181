"""The data flow in one place: read → render → truncate → supervise → examples."""

from __future__ import annotations

from dataclasses import dataclass, field

from essence.data.batching import Example
from essence.data.records import OnError, Record, Skipped, read_records
from essence.data.render import Rendered, render
from essence.data.supervision import SupervisionConfig, supervise
from essence.data.truncation import Kept, TruncationConfig, truncate
from essence.errors import EssenceError


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
    limit: int | None = None
    """Read at most this many valid records (None: all)."""
    val_fraction: float = 0.0
    """Hold out this fraction of the records (at least one) for validation loss."""
    max_length: int | None = None
    """Rendered sequences longer than this are bad input (skipped or fatal per on_error)."""
    on_error: OnError = "skip"
    """skip: report bad rows and carry on; fail: stop at the first bad row."""
    chat_template: str | None = None
    """A built-in template name (chatml-think) or a Jinja file; None: the tokenizer's own."""
    truncation: TruncationConfig = field(default_factory=TruncationConfig)
    """How each sequence is cut before training."""
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    """Which segments carry the NLL and the KD loss."""


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


def render_records(
    records: list[Record], tokenizer, config: DataConfig, source: str
) -> tuple[list[Rendered], list[Skipped]]:
    """Render every record; over-long ones are bad input handled per on_error."""
    from tqdm.auto import tqdm

    rendered, skipped = [], []
    # Real datasets take a while to tokenize; tiny ones should stay quiet.
    progress = tqdm(records, desc="render", unit="rec", disable=len(records) < 2000)
    for index, record in enumerate(progress):
        item = render(record, tokenizer, config.chat_template)
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
    return rendered, skipped


def prepare(config: DataConfig, tokenizer, records: list[Record] | None = None) -> Prepared:
    """Read (unless records are given), render, truncate and supervise a dataset."""
    skipped: list[Skipped] = []
    if records is None:
        if not config.source:
            raise EssenceError("data.source is empty; set it to a data file or dataset name")
        result = read_records(
            config.source, field_map=config.field_map, on_error=config.on_error,
            config=config.config, split=config.split, limit=config.limit,
        )
        records, skipped = result.records, result.skipped
    rendered, too_long = render_records(records, tokenizer, config, config.source)
    kept = [truncate(r.spans, config.truncation) for r in rendered]
    examples = [to_example(r, k, config) for r, k in zip(rendered, kept)]
    return Prepared(examples, rendered, kept, skipped + too_long)
