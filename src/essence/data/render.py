"""Render a record with the student's chat template and find exact P / CoT / A token spans.

Segment ownership of the template's own tokens (one rule, used everywhere):

- **prompt**: everything the model is given at inference time — the system turn, the user
  turn and the assistant header (the text ``add_generation_prompt=True`` appends).
- **cot**: from the opening ``<think>`` tag through the reasoning text, the closing
  ``</think>`` tag and the blank line after it. The student must learn to open and close
  its thinking, so those tags are CoT tokens. A record with no CoT (plain instruction data)
  has an empty CoT segment, or the empty think block a template such as Qwen3's writes.
- **answer**: the answer text and every token after it (the end-of-turn ``<|im_end|>`` and
  its newline), because the student must learn to stop.

Spans come from character offsets of the rendered text (the tokenizer's offset mapping):
a token belongs to the segment that contains its first character. No token-id pattern is
ever searched for, and no segment's text either: each segment is located by rendering the
record again with a sentinel in its place (see ``_segment_start``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from essence.data.records import Record
from essence.errors import EssenceError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# The instruction appended to a problem when a prompt is built for generation (eval, sampling).
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
BUILTIN_TEMPLATES = ("chatml-think",)
DEFAULT_TEMPLATE = "chatml-think"


@dataclass(frozen=True)
class Spans:
    """Token index ranges [start, end) of each segment of one rendered sequence."""

    prompt: tuple[int, int]
    cot: tuple[int, int]
    answer: tuple[int, int]
    think_end: int | None
    """Token index just after the closing think tag (None when the template has none)."""
    think_close: int | None = None
    """Token index where the closing think tag starts (None when the template has none)."""

    @property
    def length(self) -> int:
        return self.answer[1]

    def segment_of(self, index: int) -> int:
        """Segment id of token ``index``: 1 prompt, 2 cot, 3 answer."""
        if index < self.prompt[1]:
            return 1
        if index < self.cot[1]:
            return 2
        return 3


@dataclass(frozen=True)
class Rendered:
    """One record rendered to token ids, with its segment spans and char offsets."""

    record_id: str
    input_ids: list[int]
    spans: Spans
    text: str
    offsets: list[tuple[int, int]]


def assistant_content(record: Record) -> str:
    """The assistant turn as training text: a think block with the CoT, then the answer.

    A record without a chain of thought (plain instruction data) is its answer alone; a
    template that always writes a think block (Qwen3's) still adds an empty one.
    """
    if not record.cot:
        return record.answer
    return f"{THINK_OPEN}\n{record.cot}\n{THINK_CLOSE}\n\n{record.answer}"


def messages_for(record: Record, *, with_answer: bool = True) -> list[dict]:
    """Chat messages of a record: optional system, the user prompt, the assistant turn."""
    messages = []
    if record.system:
        messages.append({"role": "system", "content": record.system})
    messages.append({"role": "user", "content": record.prompt})
    if with_answer:
        messages.append({"role": "assistant", "content": assistant_content(record)})
    return messages


@lru_cache(maxsize=None)
def _builtin_template(name: str) -> str:
    return resources.files("essence").joinpath(f"templates/{name}.jinja").read_text()


def resolve_template(tokenizer, chat_template: str | None) -> str:
    """The Jinja chat template to use: a built-in name, a file path, or the tokenizer's own.

    A tokenizer without a template gets the built-in ``chatml-think`` (ChatML turns, the
    assistant content kept verbatim, so the think block survives).
    """
    if chat_template is None:
        return tokenizer.chat_template or _builtin_template(DEFAULT_TEMPLATE)
    if chat_template in BUILTIN_TEMPLATES:
        return _builtin_template(chat_template)
    path = Path(chat_template)
    if not path.is_file():
        raise EssenceError(
            f"chat_template {chat_template!r} is neither a built-in template "
            f"({', '.join(BUILTIN_TEMPLATES)}) nor a readable file; pass one of those names "
            "or the path of a Jinja template file"
        )
    return path.read_text()


def _apply(tokenizer, messages: list[dict], template: str, *, generation: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation
    )


def generation_prompt(
    tokenizer, prompt: str, system: str | None = None, chat_template: str | None = None
) -> str:
    """The rendered chat text up to where the assistant starts, as used for evaluation."""
    template = resolve_template(tokenizer, chat_template)
    record = Record(id="prompt", system=system, prompt=prompt, cot="", answer="")
    return _apply(tokenizer, messages_for(record, with_answer=False), template, generation=True)


# Stands in for one segment's text while locating where the template puts that segment.
_SENTINEL = "\u2063essence-segment-sentinel\u2063"


def _segment_start(tokenizer, template: str, record: Record, text: str, field: str) -> int | None:
    """Character offset of ``field``'s text in ``text`` (the full rendering of ``record``).

    The record is rendered again with that field replaced by a sentinel: everything before the
    field renders the same, so the sentinel's offset is the field's offset. Searching for the
    text itself would find a short answer ("hi", "k") inside the closing ``</think>`` tag or a
    system text "system" inside the role header. None when the template drops the field or
    does not reproduce it verbatim.
    """
    import dataclasses

    probe = _apply(tokenizer, messages_for(dataclasses.replace(record, **{field: _SENTINEL})),
                   template, generation=False)
    at = probe.find(_SENTINEL)
    value = getattr(record, field)
    if at < 0 or text[at:at + len(value)] != value:
        return None
    return at


def _char_bounds(text: str, record: Record, header: str, tokenizer,
                 template: str) -> tuple[int, int, int | None]:
    """Character positions: prompt end, answer start, closing think tag start (or None)."""
    prompt_at = _segment_start(tokenizer, template, record, text, "prompt")
    if prompt_at is None:
        raise EssenceError(
            f"record {record.id!r}: the chat template does not reproduce the prompt text; "
            "pass a template that keeps message content verbatim (chat_template: chatml-think)"
        )
    cursor = prompt_at + len(record.prompt)
    cot_end = cursor
    if record.cot:
        cot_at = _segment_start(tokenizer, template, record, text, "cot")
        if cot_at is None:
            raise EssenceError(
                f"record {record.id!r}: the chat template drops the chain-of-thought from the "
                "assistant turn (templates such as DeepSeek-R1-Distill's strip reasoning), so the "
                "CoT would never be trained on; pass a reasoning-preserving template with "
                "chat_template: chatml-think (built-in) or chat_template: path/to/template.jinja"
            )
        cot_end = cot_at + len(record.cot)
    answer_at = _segment_start(tokenizer, template, record, text, "answer")
    if answer_at is None or answer_at < cot_end:
        raise EssenceError(
            f"record {record.id!r}: the chat template does not reproduce the answer after the "
            "chain-of-thought; pass a template that keeps the assistant content verbatim "
            "(chat_template: chatml-think)"
        )
    if text.startswith(header) and cursor <= len(header) <= answer_at:
        prompt_end = len(header)
    else:  # the generation prompt is not a prefix: the think block (or the answer) starts it
        open_at = text.rfind(THINK_OPEN, cursor, cot_end if record.cot else answer_at)
        prompt_end = open_at if open_at >= 0 else (cot_end - len(record.cot) if record.cot
                                                   else answer_at)
    # Only template text lies between the CoT (or the prompt) and the answer.
    close_at = text.find(THINK_CLOSE, max(cot_end, prompt_end), answer_at)
    return prompt_end, answer_at, close_at if close_at >= 0 else None


def render(record: Record, tokenizer, chat_template: str | None = None, *,
           trailing_generation_prompt: bool = False) -> Rendered:
    """Render one record to token ids and exact segment spans.

    trailing_generation_prompt appends the template's generation prompt after the assistant
    turn (answer segment), as the paper's reference code renders the whole conversation with
    add_generation_prompt=True; it only serves exact replication.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise EssenceError(
            "the tokenizer is not a fast (Rust) tokenizer, so it has no character offsets; "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    template = resolve_template(tokenizer, chat_template)
    text = _apply(tokenizer, messages_for(record), template, generation=False)
    header = _apply(tokenizer, messages_for(record, with_answer=False), template, generation=True)
    prompt_end, answer_at, close_at = _char_bounds(text, record, header, tokenizer, template)
    if trailing_generation_prompt:
        extended = _apply(tokenizer, messages_for(record), template, generation=True)
        if not extended.startswith(text):
            raise EssenceError(
                f"record {record.id!r}: with add_generation_prompt the chat template rewrites the "
                "conversation instead of appending to it; set data.trailing_generation_prompt: false"
            )
        text = extended
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    n_prompt = sum(1 for start, _ in offsets if start < prompt_end)
    n_before_answer = sum(1 for start, _ in offsets if start < answer_at)
    close_tok = end_tok = None
    if close_at is not None:
        close_tok = sum(1 for s, _ in offsets if s < close_at)
        end_tok = sum(1 for s, _ in offsets if s < close_at + len(THINK_CLOSE))
    spans = Spans(
        prompt=(0, n_prompt),
        cot=(n_prompt, n_before_answer),
        answer=(n_before_answer, len(ids)),
        think_end=end_tok,
        think_close=close_tok,
    )
    assert n_prompt <= n_before_answer <= len(ids), f"record {record.id}: spans out of order"
    return Rendered(record_id=record.id, input_ids=ids, spans=spans, text=text, offsets=offsets)
