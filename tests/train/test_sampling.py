"""Training on sampled text (essence.train.sampling): masks, seeding, accounting and whole runs."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, build_small_tokenizer, train_interrupted
from safetensors.torch import load_file

from essence.config.load import load_config
from essence.config.schema import SamplingConfig
from essence.data.batching import SEGMENT_SAMPLED, Example, collate
from essence.data.pipeline import prepare
from essence.errors import EssenceError
from essence.models.flops import FlopModel
from essence.models.loading import random_causal_lm
from essence.teacher.sources import OnlineTeacher
from essence.train.accounting import Ledger
from essence.train.run import train
from essence.train.sampling import HFGenerator, Sampler, is_sampled_step
from essence.train.step import (
    DistillStep,
    combine,
    continuation_count,
    continuation_loss_weight,
    loss_weights,
    step_token_counts,
)

PAD = 0


def tiny_config(tokenizer_dir, data_file, *overrides):
    teacher = dict(TINY, hidden_size=24)
    base = [f"model.tokenizer={tokenizer_dir}", f"data.source={data_file}",
            f"model.student_init={json.dumps(TINY)}", f"model.teacher_init={json.dumps(teacher)}",
            "train.batch_size=2", "train.epochs=2", "train.lr=0.01", "train.progress=false",
            "train.warmup_ratio=0", "train.cpu_threads=1", "sampling.max_new_tokens=12"]
    return load_config(None, base + list(overrides))


def metrics(run: Path, drop=("elapsed_s", "tokens_per_s", "generation_s")) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


class FixedGenerator:
    """Writes a fixed continuation per context (keyed by its first and last ids), recording calls."""

    def __init__(self, tokens=(7, 8, 9)):
        self.tokens, self.calls = list(tokens), []

    def __call__(self, model, prompts, seed):
        self.calls.append((model, [list(p) for p in prompts], seed))
        return [[t + (p[-1] % 3) for t in self.tokens] for p in prompts]


def hand_batch():
    """Two kept leads: row 0 cut (full length 9), row 1 kept whole (full length 4)."""
    a = Example("a", [1, 2, 3, 4, 5], [1, 1, 2, 2, 2], [False, False, True, True, True],
                [False, False, False, True, True])
    b = Example("b", [1, 2, 6, 3], [1, 1, 2, 3], [False, True, True, True], [False, True, True, True])
    return collate([a, b], PAD)


def sampler(method, **fields):
    config = SamplingConfig(method=method, **fields)
    prompts = {"a": [1, 2], "b": [1, 2]}
    return Sampler(config, 0.5, prompts, {"a": 9, "b": 4}, PAD, FixedGenerator())


FLOPS = FlopModel(params=100, head=50, layers=2, attn_dim=4)


def test_lead_then_student_masks_on_a_hand_built_batch():
    s = sampler("lead_then_student")
    (out,), cost = s.sample([hand_batch()], 0, 0, 1, "student", "teacher", FLOPS, FLOPS)
    model, contexts, _ = s.generate.calls[0]
    assert model == "student" and contexts == [[1, 2, 3, 4, 5], [1, 2, 6, 3]]  # from the cut
    gen = [7 + 2, 8 + 2, 9 + 2]  # FixedGenerator for a context ending in 5
    assert out.input_ids[0].tolist() == [1, 2, 3, 4, 5, *gen]
    # The teacher-forced lead keeps its masks; the continuation is in continuation_mask only.
    assert out.nll_mask[0].tolist() == [False, False, True, True, True, False, False, False]
    assert out.kd_mask[0].tolist() == [False, False, False, True, True, False, False, False]
    assert out.continuation_mask[0].tolist() == [False] * 5 + [True] * 3
    assert out.segment_ids[0].tolist()[5:] == [SEGMENT_SAMPLED] * 3
    # Row b was kept whole: nothing to continue, masks unchanged, padding after it.
    assert out.input_ids[1].tolist()[:4] == [1, 2, 6, 3] and out.attention_mask[1].sum() == 4
    assert not out.continuation_mask[1].any()
    assert out.kd_mask[1].tolist()[:4] == [False, True, True, True]
    assert continuation_count([out]) == 3 and step_token_counts([out]) == (6, 5)
    assert cost.tokens == 6 and cost.sequences == 2  # generated for both rows, charged for both
    assert cost.flops == FLOPS.generate([5, 4], [3, 3])


@pytest.mark.parametrize("include_prompt", [False, True])
def test_on_policy_kd_targets_are_the_generated_tokens(include_prompt):
    s = sampler("on_policy", include_prompt_loss=include_prompt)
    data, sampled = s.sample([hand_batch()], 0, 0, 1, "student", "teacher", FLOPS, FLOPS)[0]
    assert s.generate.calls[0][1] == [[1, 2], [1, 2]]  # the whole prompt, not the kept lead
    assert sampled.input_ids[0].tolist() == [1, 2, 9, 10, 11]
    targets = sampled.kd_mask[0].tolist()
    assert targets == [False, include_prompt, True, True, True]
    assert not sampled.nll_mask.any() and sampled.continuation_mask is None
    # The reference's NLL stays on the dataset's (truncated) trace, which carries no KD.
    assert torch.equal(data.nll_mask, hand_batch().nll_mask) and not data.kd_mask.any()
    assert step_token_counts([data, sampled]) == (6, 6 + 2 * include_prompt)


def test_sequence_level_uses_the_teachers_text(small_tokenizer):
    student = random_causal_lm(TINY, len(small_tokenizer), seed=0)
    teacher = random_causal_lm(dict(TINY, hidden_size=24), len(small_tokenizer), seed=1)
    config = SamplingConfig(method="sequence_level", temperature=0.0, max_new_tokens=6,
                            nll_on="sample")
    stops = [small_tokenizer.eos_token_id]
    prompt = [5, 6, 7, 8]
    s = Sampler(config, 0.5, {"a": prompt, "b": prompt}, {"a": 9, "b": 9}, PAD,
                HFGenerator(config, stops, PAD))
    (batch,), cost = s.sample([hand_batch()], 0, 0, 1, student, teacher, FLOPS, FLOPS)
    greedy = teacher.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                              eos_token_id=stops, pad_token_id=PAD)[0, 4:].tolist()
    assert batch.input_ids[0].tolist()[4:4 + len(greedy)] == greedy
    assert batch.nll_mask[0].tolist() == batch.kd_mask[0].tolist()  # nll_on: sample
    assert batch.kd_mask[0].tolist()[:4] == [False] * 4 and cost.tokens >= 2


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renames gradient checkpointing
def test_generation_restores_training_mode_and_checkpointing(small_tokenizer):
    student = random_causal_lm(TINY, len(small_tokenizer), seed=0)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False  # as the trainer leaves it
    student.train()
    widths = []  # tokens fed per forward: with the KV cache, one after the prompt's prefill
    student.get_input_embeddings().register_forward_hook(lambda m, i, o: widths.append(i[0].shape[1]))
    config = SamplingConfig(method="on_policy", max_new_tokens=8)
    gen = HFGenerator(config, [small_tokenizer.eos_token_id], PAD)
    out = gen(student, [[5, 6, 7], [9]], seed=3)
    assert widths[0] == 3 and set(widths[1:]) == {1}
    assert student.training and student.is_gradient_checkpointing
    plain = random_causal_lm(TINY, len(small_tokenizer), seed=0).train()
    assert gen(plain, [[5, 6, 7], [9]], seed=3) == out  # same tokens with or without checkpointing
    assert gen(plain, [[5, 6, 7], [9]], seed=4) != out  # the seed is used
    assert all(1 <= len(row) <= 8 for row in out)


def test_generation_flops_count_the_kv_cache_attention():
    def by_steps(p, g):  # prefill, then one row per fed-back token attending to its context
        total = FLOPS.forward([p], [1])
        for k in range(1, g):
            total += 2 * FLOPS.params + 2 * FLOPS.head + 4 * FLOPS.layers * FLOPS.attn_dim * (p + k)
        return total

    assert FLOPS.generate([7, 3], [5, 1]) == by_steps(7, 5) + by_steps(3, 1)
    assert FLOPS.generate([7], [0]) == 0.0
    # Cheaper than a training-free forward over the whole sequence? No: it is the same body work
    # row by row, but the head runs on one row per token and attention on one query row.
    assert FLOPS.generate([7], [5]) < FLOPS.forward([12], [12])


def test_ledger_splits_scoring_from_the_teachers_dataset_forward():
    s = sampler("lead_then_student")
    (batch,), _ = s.sample([hand_batch()], 0, 0, 1, "student", "teacher", FLOPS, FLOPS)
    ledger = Ledger()
    ledger.add(batch, FLOPS, FLOPS)
    lead = Ledger()
    lead.add(hand_batch(), FLOPS, FLOPS)
    assert ledger.teacher_flops == lead.teacher_flops  # the lead's forward, as without sampling
    assert ledger.teacher_scoring_flops == pytest.approx(
        FLOPS.forward([8, 4], [5, 3]) - FLOPS.forward([5, 4], [2, 3]))
    assert ledger.continuation_tokens == 3 and ledger.kd_tokens == lead.kd_tokens
    ledger.add_generation(6, 123.0, 0.5, 2)
    assert ledger.total_flops == (ledger.student_flops + ledger.teacher_flops
                                  + ledger.teacher_scoring_flops + 123.0)


def test_accumulation_is_equivalent_for_sampled_batches(tokenizer_dir, data_file):
    config = tiny_config(tokenizer_dir, data_file, "data.truncation.lsp=0.5")
    tokenizer = build_small_tokenizer()
    prepared = prepare(config.data, tokenizer)
    examples = prepared.examples[:6]
    full = {r.record_id: len(r.input_ids) for r in prepared.rendered}
    student = random_causal_lm(TINY, len(tokenizer), seed=0)
    teacher = OnlineTeacher(random_causal_lm(dict(TINY, hidden_size=24), len(tokenizer), 1),
                            torch.device("cpu"))
    step = DistillStep(student, config.loss, len(tokenizer), continuation_divergence="js",
                       continuation_params={"beta": 0.3})
    lts = Sampler(SamplingConfig(method="lead_then_student"), 0.5, {}, full,
                  tokenizer.pad_token_id, FixedGenerator((11, 12, 13, 14)))

    def gradient(groups, weight=0.7):
        student.zero_grad()
        batches = [collate(g, tokenizer.pad_token_id) for g in groups]
        batches, _ = lts.sample(batches, 0, 0, 1, student, None, FLOPS, FLOPS)
        weights = loss_weights(*step_token_counts(batches), config.loss.kd_ratio)
        w_cont = continuation_loss_weight(continuation_count(batches), weight)
        for b in batches:
            out = step(b.input_ids, b.attention_mask, b.nll_mask, b.kd_mask,
                       teacher(b.input_ids, b.attention_mask), weights, b.continuation_mask, w_cont)
            assert out.continuation is not None
            combine(out, weights, w_cont).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters()])

    one_big = gradient([examples])
    many_small = gradient([[e] for e in examples])
    torch.testing.assert_close(many_small, one_big, rtol=1e-4, atol=1e-6)
    # The continuation term moves the gradient (it is not silently dropped).
    assert not torch.allclose(gradient([examples], weight=1e-9), one_big)


def test_fraction_zero_is_bit_identical_to_no_sampling(tokenizer_dir, data_file, tmp_path):
    common = ["train.max_steps=3"]
    train(tiny_config(tokenizer_dir, data_file, *common), tmp_path / "plain")
    train(tiny_config(tokenizer_dir, data_file, *common, "sampling.method=on_policy",
                      "sampling.fraction=0"), tmp_path / "zero")
    assert metrics(tmp_path / "plain") == metrics(tmp_path / "zero")
    a = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    b = load_file(tmp_path / "zero" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sampled_runs_are_reproducible_and_accounted(tokenizer_dir, data_file, tmp_path):
    common = ["train.max_steps=4", "sampling.method=on_policy", "sampling.fraction=0.5"]
    first = train(tiny_config(tokenizer_dir, data_file, *common), tmp_path / "a")
    again = train(tiny_config(tokenizer_dir, data_file, *common), tmp_path / "b")
    other = train(tiny_config(tokenizer_dir, data_file, *common, "sampling.seed=5"), tmp_path / "c")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    drawn = [m["sampled"] for m in metrics(tmp_path / "a")]
    assert drawn == [is_sampled_step(SamplingConfig("on_policy", 0.5), s) for s in range(4)]
    assert any(drawn) and not all(drawn)
    assert metrics(tmp_path / "c") != metrics(tmp_path / "a")
    # Accounting: every generated token is a KD target of the sampled batches, and it is charged.
    assert first["generated_tokens"] == again["generated_tokens"] > 0
    assert first["sampled_sequences"] == 2 * sum(drawn)
    assert first["generation_flops"] > 0 and first["teacher_scoring_flops"] > 0
    assert first["total_flops"] == pytest.approx(
        first["student_flops"] + first["teacher_flops"] + first["teacher_scoring_flops"]
        + first["generation_flops"])
    assert other["sampling"] == "on_policy@0.5"


def test_report_shows_what_generation_cost(tmp_path):
    from essence.experiments.report import build_report

    for name, sampling, gen in (("lsp-1.0", "none", 0.0), ("lts", "lead_then_student@1", 2e9)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({
            "truncation": "lsp=1" if name == "lsp-1.0" else "lsp=0.5", "steps": 3,
            "student_tokens": 10, "total_flops": 1e10, "wall_time_s": 2.0, "peak_memory_bytes": 1,
            "sampling": sampling, "generation_flops": gen, "generation_time_s": 1.5,
            "eval": {"benchmarks": {"h": {"pass@1": 0.5}}}}))
    build_report(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "| run | truncation | sampling | lsp |" in markdown
    assert "| lts | lsp=0.5 | lead_then_student@1 |" in markdown and "| 2e+09 | 1.5 s |" in markdown


def test_kill_and_resume_equals_uninterrupted_with_sampling(tokenizer_dir, data_file, tmp_path):
    overrides = ["train.max_steps=5", "train.save_every=2", "data.truncation.lsp=0.5",
                 "sampling.method=lead_then_student", "sampling.fraction=0.6"]
    train(tiny_config(tokenizer_dir, data_file, *overrides), tmp_path / "straight")
    # steps 1-3 done, checkpoint at 2: die in the middle of step 4
    train_interrupted(tiny_config(tokenizer_dir, data_file, *overrides), tmp_path / "killed",
                      after_step=3)
    resumed = train(tiny_config(tokenizer_dir, data_file, *overrides), tmp_path / "killed",
                    resume=True)
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert metrics(tmp_path / "straight") == metrics(tmp_path / "killed")
    assert sum(m["sampled"] for m in metrics(tmp_path / "straight")) >= 2
    for key in ("generated_tokens", "continuation_tokens", "student_tokens", "generation_flops"):
        assert resumed[key] == straight[key], key


@pytest.mark.parametrize("overrides, message", [
    (["sampling.method=on_policy", "loss.kd_ratio=0"], "needs an online teacher"),
    (["sampling.method=on_policy", "model.teacher_cache=somewhere"], "needs an online teacher"),
    (["sampling.method=on_policy", "sampling.nll_on=sample"], "nll_on=sample"),
    (["sampling.method=lead_then_student"], "cuts nothing"),
    (["sampling.method=lead_then_student", "data.truncation.cot_lead=0.5"], "keeps no lead span"),
    (["sampling.method=lead_then_student", "data.truncation.lsp=0.5", "loss.reduction=sequence"],
     "loss.reduction=sequence"),
    (["sampling.method=lead_then_student", "data.truncation.lsp=0.5", "sampling.divergence=js",
      "sampling.params={beta: 2}"], "sampling.params"),
    (["sampling.fraction=1.5"], "sampling.fraction"),
    (["sampling.top_k=-1"], "sampling.top_k"),
    (["sampling.max_new_tokens=0"], "sampling.max_new_tokens"),
    (["sampling.method=greedy"], "sampling.method"),
])
def test_sampling_configs_are_checked_at_load(overrides, message):
    base = ["model.student=s", "model.teacher=t"]
    with pytest.raises(EssenceError, match=message.replace(".", r"\.").replace("{", r"\{")):
        load_config(None, base + overrides)


@pytest.mark.parametrize("overrides", [
    ["data.truncation.lsp=1.0"],
    ["data.truncation.lsp=0.5", "sampling.method=lead_then_student", "sampling.fraction=0.5"],
    ["data.truncation.lsp=0.5", "sampling.method=on_policy", "sampling.fraction=0.5"],
])
def test_the_sampling_experiment_file_loads(overrides):
    config = load_config("essence:demo-sampling.yaml", ["data.source=x.jsonl", *overrides])
    assert config.sampling.top_k == 0 and config.sampling.divergence == "reverse_kl"
    assert config.sampling.active == (len(overrides) > 1)
