import pytest
from conftest import RECORDS

from essence.data.records import Record, read_records
from essence.data.render import generation_prompt, render
from essence.errors import EssenceError

ALL_FIXTURES = ["bespoke_stratos", "openr1_messages", "flat_columns", "real_bespoke_stratos_row"]
# DeepSeek-R1-Distill's template keeps only the text after </think> in assistant turns.
R1_STYLE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<｜Assistant｜>{{ c }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


def fixture_records():
    return [r for name in ALL_FIXTURES for r in read_records(str(RECORDS / f"{name}.jsonl")).records]


def segment_text(tokenizer, rendered, span):
    return tokenizer.decode(rendered.input_ids[span[0]:span[1]])


@pytest.mark.parametrize("tokenizer_name", ["qwen3_tokenizer", "small_tokenizer"])
def test_spans_are_exact(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    for record in fixture_records():
        rendered = render(record, tokenizer)
        spans = rendered.spans
        assert spans.prompt[0] == 0 and spans.prompt[1] == spans.cot[0]
        assert spans.cot[1] == spans.answer[0] and spans.answer[1] == len(rendered.input_ids)
        prompt = segment_text(tokenizer, rendered, spans.prompt)
        cot = segment_text(tokenizer, rendered, spans.cot)
        answer = segment_text(tokenizer, rendered, spans.answer)
        assert record.prompt in prompt and record.cot not in prompt
        if record.system:
            assert record.system in prompt
        # The CoT segment is exactly "<think>\n" + cot + "\n</think>\n\n": template tokens aside,
        # nothing of the prompt or the answer leaks into it.
        assert cot == f"<think>\n{record.cot}\n</think>\n\n"
        assert answer.startswith(record.answer) and answer[len(record.answer):] == "<|im_end|>\n"
        assert prompt.endswith("<|im_start|>assistant\n")
        # Decoding the whole sequence gives back the rendered text.
        assert tokenizer.decode(rendered.input_ids) == rendered.text
        assert segment_text(tokenizer, rendered, (spans.think_end - 1, spans.think_end)) == "</think>"
        assert spans.think_close == spans.think_end - 1


def test_qwen3_think_tags_are_single_tokens(qwen3_tokenizer):
    record = fixture_records()[0]
    rendered = render(record, qwen3_tokenizer)
    cot_start, cot_end = rendered.spans.cot
    assert rendered.input_ids[cot_start] == 151667  # <think> opens the CoT segment
    assert rendered.input_ids[rendered.spans.think_end - 1] == 151668
    assert rendered.input_ids[-2] == qwen3_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_default_template_when_tokenizer_has_none(small_tokenizer):
    assert small_tokenizer.chat_template is None
    record = Record("x", None, "What is 1+1?", "1+1=2.", "\\boxed{2}")
    rendered = render(record, small_tokenizer)
    assert rendered.text == (
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n1+1=2.\n</think>\n\n\\boxed{2}<|im_end|>\n"
    )
    assert generation_prompt(small_tokenizer, "Q") == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def test_r1_style_template_is_refused(qwen3_tokenizer, tmp_path):
    record = fixture_records()[0]
    template = tmp_path / "r1.jinja"
    template.write_text(R1_STYLE)
    with pytest.raises(EssenceError, match="drops the chain-of-thought.*chat_template: chatml-think"):
        render(record, qwen3_tokenizer, chat_template=str(template))


def test_builtin_template_by_name_and_bad_name(qwen3_tokenizer):
    record = fixture_records()[1]
    rendered = render(record, qwen3_tokenizer, chat_template="chatml-think")
    assert rendered.text.startswith("<|im_start|>system\n")
    with pytest.raises(EssenceError, match="neither a built-in template"):
        render(record, qwen3_tokenizer, chat_template="no-such-template")


def test_generation_prompt_matches_training_prefix(qwen3_tokenizer):
    record = fixture_records()[0]
    rendered = render(record, qwen3_tokenizer)
    prefix = generation_prompt(qwen3_tokenizer, record.prompt, record.system)
    assert rendered.text.startswith(prefix)
    n_prompt = rendered.spans.prompt[1]
    assert qwen3_tokenizer.decode(rendered.input_ids[:n_prompt]) == prefix


def test_real_bespoke_row_lengths(qwen3_tokenizer):
    record = read_records(str(RECORDS / "real_bespoke_stratos_row.jsonl")).records[0]
    spans = render(record, qwen3_tokenizer).spans
    assert 1500 < spans.answer[1] - spans.cot[0] < 2000  # ~1.7k-token assistant turn
    assert 200 < spans.prompt[1] < 450  # ~240-token system prompt plus the problem


# Segment texts that occur inside the template's own text: the closing tag (hi, in, k, n, think,
# </, >), the think tag, the role headers (system, user, assistant) and the end-of-turn marker.
SHORT = ["hi", "in", "k", "n", "t", "h", "think", "</", ">", "/", "<", "im", "end", "assistant"]


@pytest.mark.parametrize("answer", SHORT)
@pytest.mark.parametrize("tokenizer_name", ["qwen3_tokenizer", "small_tokenizer"])
def test_short_answers_inside_the_closing_tag(answer, tokenizer_name, request):
    from essence.data.truncation import TruncationConfig, truncate

    tokenizer = request.getfixturevalue(tokenizer_name)
    record = Record(id="short", system=None, prompt="Say it.", cot="Some reasoning.", answer=answer)
    rendered = render(record, tokenizer)
    spans = rendered.spans
    assert segment_text(tokenizer, rendered, spans.cot) == "<think>\nSome reasoning.\n</think>\n\n"
    assert segment_text(tokenizer, rendered, spans.answer) == f"{answer}<|im_end|>\n"
    assert spans.think_end is not None and spans.think_close == spans.think_end - 1
    lead = truncate(spans, TruncationConfig(cot_lead=0.0))
    assert spans.think_close in lead.indices()  # cot_lead keeps the closing tag


@pytest.mark.parametrize("system, prompt, cot", [
    ("system", "Say it.", "Some reasoning."),
    ("user", "user", "think"),
    ("assistant", "assistant", "k"),
    ("im_start", "<think>", "<"),
    ("Be brief.", "system", "\\n"),
])
def test_short_texts_inside_role_headers_and_tags(system, prompt, cot, qwen3_tokenizer):
    tokenizer = qwen3_tokenizer
    record = Record(id="short", system=system, prompt=prompt, cot=cot, answer="hi")
    rendered = render(record, tokenizer)
    spans = rendered.spans
    head = segment_text(tokenizer, rendered, spans.prompt)
    assert head == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert segment_text(tokenizer, rendered, spans.cot) == f"<think>\n{cot}\n</think>\n\n"
    assert segment_text(tokenizer, rendered, spans.answer) == "hi<|im_end|>\n"


@pytest.mark.parametrize("tokenizer_name", ["qwen3_tokenizer", "small_tokenizer"])
def test_plain_instruction_record_has_no_think_block_of_its_own(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    record = Record(id="plain", system=None, prompt="Translate bonjour.", cot="", answer="hello")
    rendered = render(record, tokenizer)
    spans = rendered.spans
    assert segment_text(tokenizer, rendered, spans.answer) == "hello<|im_end|>\n"
    assert segment_text(tokenizer, rendered, spans.prompt).endswith("<|im_start|>assistant\n")
    cot = segment_text(tokenizer, rendered, spans.cot)
    if tokenizer_name == "qwen3_tokenizer":  # Qwen3's template always writes a think block
        assert cot == "<think>\n\n</think>\n\n" and spans.think_end is not None
    else:  # chatml-think keeps the content verbatim: no CoT tokens at all
        assert cot == "" and spans.think_end is None
