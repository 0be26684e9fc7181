"""The evaluation prompt: the problem and an answer-format instruction in the model's chat template."""

from __future__ import annotations

from essence.data.render import DEFAULT_INSTRUCTION, generation_prompt


def user_message(problem: str, instruction: str | None = DEFAULT_INSTRUCTION) -> str:
    """The user turn: the problem, then the instruction (none when `instruction` is empty)."""
    return f"{problem}\n\n{instruction}" if instruction else problem


def build_prompt(
    tokenizer,
    problem: str,
    *,
    instruction: str | None = DEFAULT_INSTRUCTION,
    system: str | None = None,
    chat_template: str | None = None,
) -> str:
    """The chat text up to where the assistant starts, so the model opens its own think block.

    It is rendered exactly as in training (`essence.data.render.generation_prompt`): the same
    template, the same system turn, so the student is evaluated on the format it learned.
    chat_template: None for the tokenizer's own, a built-in name, or a Jinja file path.
    """
    return generation_prompt(
        tokenizer, user_message(problem, instruction), system=system, chat_template=chat_template
    )
