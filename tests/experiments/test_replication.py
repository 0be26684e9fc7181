"""Replication of the paper's reference data path on a Bespoke-Stratos row (issue 10).

The reference renders only the user and assistant turns with the student's chat template,
calling apply_chat_template(..., add_generation_prompt=True) on the whole conversation, and
keeps int(n·x) tokens at LSP x. The numbers below were computed by hand from the Qwen3
tokenizer: the prompt is 148 tokens (395 with the Sky-T1 system prompt), the think block runs
from token 148 to the closing tag at 1457 plus its blank line (1,311 CoT tokens), and the
rendering is 1,861 tokens with the trailing generation prompt (1,858 without).
"""

from __future__ import annotations

import json

from conftest import RECORDS

from essence.data.pipeline import DataConfig, prepare
from essence.data.truncation import TruncationConfig

ROW = RECORDS / "real_bespoke_stratos_row.jsonl"


def reference_ids(tokenizer) -> list[int]:
    """The reference's rendering of the row, from its documented behaviour: thought markers
    become think tags, the solution markers go, the system column is ignored."""
    row = json.loads(ROW.read_text().splitlines()[0])
    user = next(t["value"] for t in row["conversations"] if t["from"] == "user")
    reply = next(t["value"] for t in row["conversations"] if t["from"] == "assistant")
    for marker, tag in (("<|begin_of_solution|>\n\n", ""), ("\n\n<|end_of_solution|>", ""),
                        ("<|begin_of_thought|>", "<think>"), ("<|end_of_thought|>", "</think>")):
        reply = reply.replace(marker, tag)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
        tokenize=False, add_generation_prompt=True, enable_thinking=True)
    return tokenizer(text)["input_ids"]


def prepared(tokenizer, **data):
    config = DataConfig(source=str(ROW), truncation=TruncationConfig(lsp=0.5), **data)
    return prepare(config, tokenizer)


def test_paper_rendering_and_lsp_cut_match_the_reference(qwen3_tokenizer):
    paper = prepared(qwen3_tokenizer, system_prompt="drop", trailing_generation_prompt=True)
    rendered, kept = paper.rendered[0], paper.kept[0]
    assert rendered.input_ids == reference_ids(qwen3_tokenizer)
    assert rendered.spans.prompt == (0, 148) and rendered.spans.cot == (148, 1459)
    assert len(rendered.input_ids) == 1861 and rendered.spans.think_close == 1457
    assert kept.ranges == ((0, 930),)  # int(1861 * 0.5)
    assert (kept.prompt, kept.cot, kept.answer) == (148, 782, 0)
    assert f"{kept.cot / 1311:.1%}" == "59.6%"  # of the CoT, as the issue measured


def test_system_prompt_keep_drop_and_replace(qwen3_tokenizer):
    kept_system = prepared(qwen3_tokenizer)
    assert kept_system.rendered[0].spans.prompt == (0, 395)
    assert kept_system.kept[0].cot == 657 and f"{657 / 1311:.1%}" == "50.1%"
    dropped = prepared(qwen3_tokenizer, system_prompt="drop")
    assert dropped.rendered[0].spans.prompt == (0, 148) and len(dropped.rendered[0].input_ids) == 1858
    assert dropped.kept[0].ranges == ((0, 929),)
    replaced = prepared(qwen3_tokenizer, system_prompt="You are terse.")
    assert replaced.rendered[0].text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert "Your role as an assistant" not in replaced.rendered[0].text
