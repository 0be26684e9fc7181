"""Read reasoning-trace rows from files or the hub into uniform ``Record``s.

Three schemas are detected per row (a dataset may mix them), and ``field_map`` names
the columns of any other flat layout:

- ShareGPT ``conversations: [{from, value}]`` (+ optional ``system`` column) whose assistant
  turn wraps the CoT in ``<|begin_of_thought|>…<|end_of_thought|>`` and the answer in
  ``<|begin_of_solution|>…<|end_of_solution|>`` (Bespoke-Stratos, OpenThoughts, Sky-T1);
- chat ``messages: [{role, content}]`` whose assistant content holds ``<think>…</think>``
  or whose assistant message has a ``reasoning_content`` field (OpenR1-Math);
- flat columns: prompt, reasoning (a string or a list of strings) and answer;
- SYNTHETIC-1 ``prompt`` + ``llm_response`` and Nemotron ``input`` (messages) + ``output``,
  whose response holds ``<think>…</think>`` inline;
- plain instruction data with no chain of thought: a prompt (or ``instruction`` [+ ``input``])
  with a ``response`` / ``output`` / ``completion`` column, a SYNTHETIC-1 or Nemotron response
  without a think block, or a field_map naming prompt and answer but no cot. Such a record has
  ``cot == ""``: the response is its answer segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from essence.data.readers import read_rows
from essence.errors import EssenceError

OnError = Literal["skip", "fail"]
PROMPT_KEYS = ("problem", "question", "prompt")
COT_KEYS = ("reasoning", "thinking", "deepseek_reasoning", "thinking_trajectories")
ANSWER_KEYS = ("answer", "solution", "attempt", "deepseek_solution")
ID_KEYS = ("id", "unique_id", "uuid")
RESPONSE_KEYS = ("response", "output", "completion")
FIELD_MAP_KEYS = ("id", "system", "prompt", "cot", "answer")
THOUGHT = ("<|begin_of_thought|>", "<|end_of_thought|>")
SOLUTION = ("<|begin_of_solution|>", "<|end_of_solution|>")
THINK = ("<think>", "</think>")


@dataclass(frozen=True)
class Record:
    """One reasoning trace: the prompt, the chain-of-thought and the final answer."""

    id: str
    system: str | None
    prompt: str
    cot: str
    """The chain of thought; "" for plain instruction data, which has none."""
    answer: str
    meta: dict = field(default_factory=dict)


class RowError(ValueError):
    """A row that cannot become a Record; ``field`` names the offending column."""

    def __init__(self, field_name: str | None, reason: str):
        super().__init__(reason)
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True)
class Skipped:
    """A row that was not read, and why."""

    source: str
    row: int
    record_id: str | None
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.source} row {self.row}"
        if self.record_id:
            shown = self.record_id if self.record_id.isprintable() else repr(self.record_id)
            where += f" (id {shown[:60]}{'…' if len(shown) > 60 else ''})"
        what = f"field {self.field!r}: " if self.field else ""
        return f"{where}: {what}{self.reason}"


@dataclass
class ReadResult:
    """The records read from one source, plus the rows skipped with their reasons."""

    records: list[Record]
    skipped: list[Skipped]


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise RowError(key, "missing")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "\n\n".join(v.strip() for v in value)
    if not isinstance(value, str):
        raise RowError(key, f"is {type(value).__name__}, expected a string")
    if not value.strip():
        raise RowError(key, "is empty")
    return value.strip()


def _between(text: str, markers: tuple[str, str], where: str) -> tuple[str, str] | None:
    """Split ``text`` at a marked block: (inside, after), or None when there is none."""
    open_tag, close_tag = markers
    start = text.find(open_tag)
    if start < 0:
        return None
    end = text.find(close_tag, start)
    if end < 0:
        raise RowError(where, f"has {open_tag} but no closing {close_tag}")
    return text[start + len(open_tag) : end], text[end + len(close_tag) :]


def _split_assistant(text: str, where: str) -> tuple[str, str]:
    """(cot, answer) from an assistant turn with thought/solution markers or think tags."""
    thought = _between(text, THOUGHT, where)
    if thought is not None:
        cot, rest = thought
        solution = _between(rest, SOLUTION, where)
        answer = solution[0] if solution is not None else rest
        return cot, answer
    think = _between(text, THINK, where)
    if think is None:
        raise RowError(where, "has no reasoning block (<think>…</think> or thought markers)")
    return think


def _clean(value: str, name: str) -> str:
    value = value.strip()
    if not value:
        raise RowError(name, "is empty")
    return value


def _from_conversations(row: dict) -> tuple[str | None, str, str, str]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise RowError("conversations", "is not a list of turns")
    system = row.get("system") or None
    user = assistant = None
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RowError("conversations", "has a turn without a string 'value'")
        role = turn.get("from")
        if role in ("user", "human") and user is None:
            user = turn["value"]
        elif role in ("assistant", "gpt") and assistant is None:
            assistant = turn["value"]
        elif role == "system" and system is None:
            system = turn["value"]
    if user is None:
        raise RowError("conversations", "has no user turn")
    if assistant is None:
        raise RowError("conversations", "has no assistant turn")
    cot, answer = _split_assistant(assistant, "conversations")
    return system, user, cot, answer


def _from_messages(row: dict) -> tuple[str | None, str, str, str]:
    messages = row["messages"]
    if not isinstance(messages, list):
        raise RowError("messages", "is not a list of messages")
    system = user = assistant = None
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RowError("messages", "has a message without a string 'content'")
        role = message.get("role")
        if role == "system" and system is None:
            system = message["content"]
        elif role == "user" and user is None:
            user = message["content"]
        elif role == "assistant" and assistant is None:
            assistant = message
    if user is None:
        raise RowError("messages", "has no user message")
    if assistant is None:
        raise RowError("messages", "has no assistant message")
    reasoning = assistant.get("reasoning_content")
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise RowError("reasoning_content", "is not a string")
        return system, user, reasoning, assistant["content"]
    cot, answer = _split_assistant(assistant["content"], "messages")
    return system, user, cot, answer


def _first_key(row: dict, keys: tuple[str, ...], role: str) -> str:
    for key in keys:
        if key in row:
            return key
    raise RowError(role, f"missing: none of the columns {', '.join(keys)} is present")


def _from_flat(row: dict, field_map: dict[str, str]) -> tuple[str | None, str, str | None, str]:
    system_key = field_map.get("system", "system")
    system = _text(row, system_key) if row.get(system_key) else None
    has_cot = field_map.get("cot") or any(k in row for k in COT_KEYS)
    if not has_cot and "instruction" in row and not field_map.get("prompt"):
        # Alpaca layout: the instruction, then its optional input, is the prompt.
        extra = row.get("input")
        prompt = _text(row, "instruction") + (f"\n\n{extra.strip()}" if isinstance(extra, str)
                                              and extra.strip() else "")
        return system, prompt, *_split_response(_text(row, _first_key(row, RESPONSE_KEYS,
                                                                       "response")), "response")
    prompt_key = field_map.get("prompt") or _first_key(row, PROMPT_KEYS, "prompt")
    if not has_cot and (field_map.get("answer") or any(k in row for k in RESPONSE_KEYS)):
        key = field_map.get("answer") or _first_key(row, RESPONSE_KEYS, "response")
        return system, _text(row, prompt_key), *_split_response(_text(row, key), key)
    cot_key = field_map.get("cot") or _first_key(row, COT_KEYS, "cot")
    answer_key = field_map.get("answer") or _first_key(row, ANSWER_KEYS, "answer")
    return system, _text(row, prompt_key), _text(row, cot_key), _text(row, answer_key)


def _split_response(text: str, where: str) -> tuple[str | None, str]:
    """(cot, answer) of a response with its reasoning inline; cot None when there is none."""
    think = _between(text, THINK, where)
    if think is None:
        return None, text
    cot, answer = think
    return (cot if cot.strip() else None), answer


def _first_of(value: Any) -> Any:
    """A column's value, or the first element of a one-per-row list of them."""
    return value[0] if isinstance(value, list) and value else value


def _from_synthetic1(row: dict) -> tuple[str | None, str, str | None, str]:
    """SYNTHETIC-1 style: ``prompt`` and ``llm_response`` with ``<think>…</think>`` inline."""
    prompt, response = _first_of(row.get("prompt")), _first_of(row.get("llm_response"))
    for name, value in (("prompt", prompt), ("llm_response", response)):
        if not isinstance(value, str) or not value.strip():
            raise RowError(name, "is missing or not a non-empty string")
    return (row.get("system") or None), prompt, *_split_response(response, "llm_response")


def _from_nemotron(row: dict) -> tuple[str | None, str, str | None, str]:
    """Nemotron style: ``input`` (chat messages or a string) and ``output`` (the response)."""
    messages, output = row["input"], _first_of(row["output"])
    if isinstance(messages, list) and messages and isinstance(messages[0], list):
        messages = messages[0]
    system = row.get("system_prompt") or row.get("system") or None
    if isinstance(messages, str):
        prompt = messages
    elif isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        users = [m.get("content") for m in messages if m.get("role") == "user"]
        system = next((m.get("content") for m in messages if m.get("role") == "system"), system)
        prompt = users[0] if users else None
    else:
        raise RowError("input", "is neither a string nor a list of chat messages")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError("input", "has no user message with string content")
    if not isinstance(output, str) or not output.strip():
        raise RowError("output", "is missing or not a non-empty string")
    return (system if isinstance(system, str) else None), prompt, *_split_response(output, "output")


def row_to_record(row: Any, default_id: str, field_map: dict[str, str] | None = None) -> Record:
    """Convert one row to a Record, or raise RowError naming the field at fault."""
    if not isinstance(row, dict):
        raise RowError(None, f"is {type(row).__name__}, expected a JSON object")
    field_map = field_map or {}
    if field_map.get("prompt") or field_map.get("cot"):
        parts = _from_flat(row, field_map)
    elif "conversations" in row:
        parts = _from_conversations(row)
    elif "messages" in row:
        parts = _from_messages(row)
    elif "llm_response" in row:
        parts = _from_synthetic1(row)
    elif "output" in row and "input" in row and "instruction" not in row:
        parts = _from_nemotron(row)
    else:
        parts = _from_flat(row, field_map)
    system, prompt, cot, answer = parts
    id_key = field_map.get("id") or next((k for k in ID_KEYS if row.get(k) is not None), None)
    record_id = str(row[id_key]) if id_key and row.get(id_key) is not None else default_id
    known = {"conversations", "messages", "system", "system_prompt", "llm_response", "input",
             "instruction", *PROMPT_KEYS, *COT_KEYS, *ANSWER_KEYS, *RESPONSE_KEYS}
    meta = {k: v for k, v in row.items() if k not in known and isinstance(v, (str, int, float))}
    return Record(
        id=record_id,
        system=system.strip() if isinstance(system, str) and system.strip() else None,
        prompt=_clean(prompt, "prompt"),
        cot="" if cot is None else _clean(cot, "cot"),
        answer=_clean(answer, "answer"),
        meta=meta,
    )


def read_records(
    source: str,
    *,
    field_map: dict[str, str] | None = None,
    on_error: OnError = "skip",
    config: str | None = None,
    split: str = "train",
    limit: int | None = None,
) -> ReadResult:
    """Read every row of a local file or hub dataset; skip or fail on bad rows."""
    if on_error not in ("skip", "fail"):
        raise EssenceError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    unknown = set(field_map or {}) - set(FIELD_MAP_KEYS)
    if unknown:
        raise EssenceError(
            f"field_map has unknown keys {sorted(unknown)}; valid keys are {FIELD_MAP_KEYS}"
        )
    stem = Path(source).stem
    records: list[Record] = []
    skipped: list[Skipped] = []
    for index, (row, parse_error) in enumerate(read_rows(source, config, split)):
        if limit is not None and len(records) >= limit:
            break
        row_id = None
        try:
            if parse_error:
                raise RowError(None, parse_error)
            if isinstance(row, dict):
                row_id = next((str(row[k]) for k in ID_KEYS if row.get(k) is not None), None)
            records.append(row_to_record(row, f"{stem}:{index}", field_map))
        except RowError as err:
            skip = Skipped(source, index, row_id, err.field, err.reason)
            if on_error == "fail":
                raise EssenceError(f"{skip} (set data.on_error: skip to skip bad rows)") from None
            skipped.append(skip)
    return ReadResult(records, skipped)
