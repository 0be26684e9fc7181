"""Build the embedded demo: a tokenizer, a teacher that solves the synthetic task, a base student.

The three ship in src/essence/assets/demo/{teacher,student} (each folder holds its model and
the same tokenizer) so that a newcomer can watch distillation work on a laptop CPU with
nothing to download. Everything is seeded: the same command on the same machine rebuilds
the same files.

    python scripts/build_demo_models.py                 # writes src/essence/assets/demo/
    python scripts/build_demo_models.py --only student  # rebuild one model (same tokenizer)

The two models are made the way the paper's are:

- teacher (4 layers x 128): trained on complete traces of the demo's (hard) problems until it
  solves held-out ones greedily;
- base student (2 layers x 96): made the way a base model is: trained on complete traces of
  *easier* problems (fewer steps), two conversations packed per sequence as pre-training packs
  documents, until it solves most of those. It knows the whole format (open the
  think block, work, re-check, close it, write the solution up, box the answer, stop) and
  finishes its traces, but fails the harder problems the demo distils, as Qwen3-4B-Base
  knows how to conclude a text long before it can solve competition math.

Both are graded on the same 200 held-out hard problems, the student also on 200 easy ones
(greedy, stop at <|im_end|>, last \\boxed{} integer, cross-checked with math-verify); the
numbers go into the assets' README.md. It prints its own run time at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from math_verify import parse, verify
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from demo_models_record import record_build, write_readme  # noqa: E402  (scripts/ is on sys.path)
from essence.data.synth import (
    DEFAULT_DIGITS,
    DEFAULT_STEPS,
    DEMO_INSTRUCTION,
    EASY_STEPS,
    generate,
)

REPO = Path(__file__).resolve().parents[1]
SEED = 1234
TOKENIZER_SEED, TRAIN_SEED, EVAL_SEED = 1, 2, 3
STEPS, EASY, DIGITS = DEFAULT_STEPS, EASY_STEPS, DEFAULT_DIGITS  # the synthetic task's difficulty
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass
class ModelSpec:
    """One demo model's shape and training budget."""

    layers: int
    hidden: int
    steps: int
    lr: float
    batch: int
    data: tuple[int, int]
    """The range of problem steps it is trained on."""
    pack: int = 1
    """Conversations per training sequence, one after another, as base models are pre-trained on
    packed documents: the base student then ends a trace at every position a hard trace reaches."""


TEACHER = ModelSpec(layers=4, hidden=128, steps=3000, lr=2e-3, batch=4, data=STEPS)
STUDENT = ModelSpec(layers=2, hidden=96, steps=3500, lr=3e-3, batch=4, data=EASY, pack=2)
# What the build must reach on held-out problems: the teacher solves the hard ones; the base
# student solves the easy ones, finishes (closes its think block, boxes an answer, stops) on
# the hard ones, and solves few of them.
TEACHER_MIN, STUDENT_EASY_MIN, STUDENT_FINISHED_MIN, STUDENT_HARD_MAX = 0.95, 0.75, 0.95, 0.35


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of a few hundred tokens: one token per digit, ChatML and think tags whole."""
    tok = Tokenizer(models.BPE())
    # Digits stand alone (one token each, whatever precedes them); the rest may merge across
    # spaces, so the template's fixed phrases cost a token or two and sequences stay short.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024, show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rows = generate(4000, TOKENIZER_SEED, steps=(1, STEPS[1] + 1), digits=DIGITS)
    texts = [m["content"] for r in rows for m in messages(r)] + ["user\n", "assistant\n"]
    tok.train_from_iterator(texts, trainer)
    # Not special: like Qwen3's, they survive decode(skip_special_tokens=True).
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=1024
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def messages(row: dict, reasoning: str | None = None) -> list[dict]:
    """The training conversation: the lead's renderer builds exactly this from a synthetic row."""
    reasoning = row["reasoning"] if reasoning is None else reasoning
    return [
        {"role": "user", "content": row["problem"] + "\n" + DEMO_INSTRUCTION},
        {"role": "assistant", "content": "<think>\n" + reasoning + "\n</think>\n\n" + row["answer"]},
    ]


def render(row: dict, reasoning: str | None = None) -> str:
    """ChatML text of one training conversation (tokenizer-independent, same as the template)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages(row, reasoning))


def encode(tok, row: dict, reasoning: str | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of one conversation and which carry loss: the assistant content and its <|im_end|>."""
    text = tok.apply_chat_template(messages(row, reasoning), tokenize=False)
    assert text == render(row, reasoning), "chat template and render() disagree"
    start = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    end = text.rindex("<|im_end|>") + len("<|im_end|>")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [start <= a and b <= end for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask


def new_model(spec: ModelSpec, tok) -> LlamaForCausalLM:
    """A small Llama with tied embeddings; heads of width 32."""
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=spec.hidden, intermediate_size=3 * spec.hidden,
        num_hidden_layers=spec.layers, num_attention_heads=spec.hidden // 32,
        num_key_value_heads=spec.hidden // 32, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def batches(examples: list[tuple[list[int], list[bool]]], batch: int, rng: random.Random, pad: int):
    """Endless length-grouped batches: input_ids, labels (-100 off the mask), attention_mask."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for lo in range(0, len(order), 64 * batch):
            chunk = sorted(order[lo : lo + 64 * batch], key=lambda i: len(examples[i][0]))
            groups = [chunk[i : i + batch] for i in range(0, len(chunk) - batch + 1, batch)]
            rng.shuffle(groups)
            for g in groups:
                yield collate([examples[i] for i in g], pad)


def collate(examples, pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad)
    labels = torch.full((len(examples), width), -100)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for r, (x, m) in enumerate(examples):
        ids[r, : len(x)] = torch.tensor(x)
        labels[r, : len(x)] = torch.where(torch.tensor(m), torch.tensor(x), -100)
        attn[r, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def train(model, spec: ModelSpec, examples, device: str, log_every: int = 100) -> None:
    """AdamW with warm-up and cosine decay; next-token loss on the assistant turn only."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / spec.steps)))))
    stream = batches(examples, spec.batch, random.Random(SEED), model.config.pad_token_id)
    t0 = time.time()
    for step in range(1, spec.steps + 1):
        b = {k: v.to(device) for k, v in next(stream).items()}
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == spec.steps:
            print(f"  step {step}/{spec.steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


BOXED = re.compile(r"\\boxed\{(-?\d+)\}")
FINISHED = re.compile(r"<think>\n.*\n</think>\n\n.*\\boxed\{\d+\}\.?<\|im_end\|>", re.S)
MAX_NEW_TOKENS = 512  # the longest trace of the demo's problems is about 400 tokens


def finished(completion: str) -> bool:
    """It closed its think block, boxed an answer after it, and stopped (`completion` as decoded)."""
    return "<|im_end|>" in completion and bool(FINISHED.match(completion.split("<|im_end|>")[0] + "<|im_end|>"))


@dataclass
class Score:
    """A model's greedy results on the held-out problems."""

    accuracy: float  # last \boxed{} integer equals the ground truth
    math_verify: float  # math-verify says the completion's answer equals the ground truth
    finished: float  # <think>, working, </think>, an answer with a \boxed{N}, then <|im_end|>
    completions: list[str]


@torch.no_grad()
def evaluate(model, tok, rows: list[dict], device: str, batch: int = 100) -> Score:
    """Greedy completions of the rows' prompts, stopped at <|im_end|>, graded two ways."""
    tok.padding_side = "left"
    outs = []
    for lo in range(0, len(rows), batch):
        prompts = [tok.apply_chat_template(messages(r)[:1], tokenize=False, add_generation_prompt=True)
                   for r in rows[lo : lo + batch]]
        enc = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
        gen = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        outs += [tok.decode(g, skip_special_tokens=False) for g in gen[:, enc["input_ids"].shape[1] :]]
    texts = [o.split("<|im_end|>")[0] for o in outs]
    truths = [r["meta"]["result"] for r in rows]
    regex = [bool(f := BOXED.findall(t)) and int(f[-1]) == y for t, y in zip(texts, truths)]
    by_mv = [bool(verify(parse(f"${y}$"), parse(t))) for t, y in zip(texts, truths)]
    done = [finished(o) for o in outs]
    n = len(rows)
    return Score(sum(regex) / n, sum(by_mv) / n, sum(done) / n, texts)


def build_model(spec: ModelSpec, tok, n_train: int, held_out: set[str], device: str) -> LlamaForCausalLM:
    """Train one demo model from scratch on complete traces of problems with `spec.data` steps."""
    rows = [r for r in generate(n_train, TRAIN_SEED, steps=spec.data, digits=DIGITS) if r["problem"] not in held_out]
    examples = [encode(tok, r) for r in rows]
    k = spec.pack
    examples = [(sum((ids for ids, _ in group), []), sum((m for _, m in group), []))
                for group in (examples[i : i + k] for i in range(0, len(examples) - k + 1, k))]
    torch.manual_seed(SEED)
    model = new_model(spec, tok)
    print(f"{model.num_parameters():,} parameters, {spec.steps} steps of {spec.batch} x {k} on {len(rows)} traces "
          f"of {spec.data[0]}-{spec.data[1]}-step problems", flush=True)
    train(model, spec, examples, device)
    return model


def grade(name: str, model, tok, eval_sets: dict[str, list[dict]], device: str) -> dict[str, Score]:
    """Score one model on each held-out set, printing a line per set."""
    scores = {}
    for label, rows in eval_sets.items():
        s = scores[label] = evaluate(model, tok, rows, device)
        print(f"  {name} on {label} problems: accuracy {s.accuracy:.1%} (math-verify {s.math_verify:.1%}), "
              f"finished {s.finished:.1%}\n    e.g. {s.completions[0]!r}", flush=True)
    return scores


def save(model, tok, folder: Path) -> None:
    """Model (safetensors) and tokenizer in one folder, readable by every user of the package."""
    model.save_pretrained(folder)
    tok.padding_side = "right"  # evaluate() padded on the left; ship the usual default
    tok.backend_tokenizer.no_padding()
    tok.save_pretrained(folder)
    config = folder / "tokenizer_config.json"
    # transformers 5 names its fast-tokenizer class TokenizersBackend, which 4.x cannot load;
    # PreTrainedTokenizerFast means the same class in both.
    config.write_text(config.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
    for f in folder.iterdir():
        f.chmod(0o644)  # safetensors writes owner-only files


def targets_missed(results: dict[str, tuple[ModelSpec, int, dict[str, Score]]]) -> list[str]:
    """What the built models fail of the targets above (empty when all are met)."""
    missed = []
    if "teacher" in results and (t := results["teacher"][2]["hard"].accuracy) < TEACHER_MIN:
        missed.append(f"teacher solves {t:.1%} of the hard problems (want >= {TEACHER_MIN:.0%})")
    if "student" in results:
        s = results["student"][2]
        if s["easy"].accuracy < STUDENT_EASY_MIN:
            missed.append(f"student solves {s['easy'].accuracy:.1%} of the easy ones (want >= {STUDENT_EASY_MIN:.0%})")
        if s["hard"].finished < STUDENT_FINISHED_MIN:
            missed.append(f"student finishes {s['hard'].finished:.1%} of the hard ones "
                          f"(want >= {STUDENT_FINISHED_MIN:.0%})")
        if s["hard"].accuracy > STUDENT_HARD_MAX:
            missed.append(f"student solves {s['hard'].accuracy:.1%} of the hard ones (want <= {STUDENT_HARD_MAX:.0%})")
    return missed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "src/essence/assets/demo"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest for models this small")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--only", choices=["teacher", "student"], help="build one model")
    ap.add_argument("--regrade", action="store_true", help="grade the saved models, do not train")
    ap.add_argument("--train-seconds", type=float, default=None, help="with --regrade: the build's time")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    out = Path(args.out)
    tok = build_tokenizer()
    eval_sets = {"hard": generate(200, EVAL_SEED, steps=STEPS, digits=DIGITS),
                 "easy": generate(200, EVAL_SEED, steps=EASY, digits=DIGITS)}
    held_out = {r["problem"] for rows in eval_sets.values() for r in rows}
    print(f"tokenizer: {len(tok)} tokens")
    results, builds = {}, {}
    for name, spec in (("teacher", TEACHER), ("student", STUDENT)):
        if args.only and name != args.only:
            continue
        print(f"{name}:", end=" ")
        t0 = time.time()
        if args.regrade:  # the spec it was built with, when recorded
            model, train_s = LlamaForCausalLM.from_pretrained(out / name).to(args.device).eval(), args.train_seconds
            before = json.loads((out / "build.json").read_text()).get(name) if (out / "build.json").is_file() else None
            if before:
                spec = ModelSpec(**{**before["spec"], "data": tuple(before["spec"]["data"])})
                train_s = train_s or before["train_s"]
        else:
            model = build_model(spec, tok, args.n_train, held_out, args.device)
            train_s = time.time() - t0
        sets = eval_sets if name == "student" else {"hard": eval_sets["hard"]}
        results[name] = (spec, model.num_parameters(), grade(name, model, tok, sets, args.device))
        if not args.regrade:
            save(model.to("cpu"), tok, out / name)
        builds = record_build(out, name, spec, model.num_parameters(), results[name][2], train_s)
    total_s = time.time() - started
    if {"teacher", "student"} <= set(builds):
        if not args.only and not args.regrade:  # a whole build: its wall time and the machine's load
            builds["_run"] = {"total_s": total_s, "load_average": os.getloadavg()[0]}
            (out / "build.json").write_text(json.dumps(builds, indent=1) + "\n")
        write_readme(out, tok, builds, {"STEPS": STEPS, "EASY": EASY, "EVAL_SEED": EVAL_SEED,
                                        "MAX_NEW_TOKENS": MAX_NEW_TOKENS, "SEED": SEED,
                                        "TOKENIZER_SEED": TOKENIZER_SEED, "TRAIN_SEED": TRAIN_SEED})
    print(f"done in {total_s / 60:.1f} minutes; wrote {out}")
    if missed := targets_missed(results):
        raise SystemExit("targets missed: " + "; ".join(missed) + "; change TEACHER / STUDENT")


if __name__ == "__main__":
    main()
