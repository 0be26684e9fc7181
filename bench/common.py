"""What bench/throughput.py and bench/lsp_scaling.py share: models, realistic traces, the step, memory.

Models: the real SmolLM2-135M-Instruct teacher with a layer-dropped student (`--models smollm2`,
from the essence cache), or random-initialised models of given dimensions (`--models random`,
presets of Qwen3-1.7B / Qwen3-4B's published shapes, or tiny ones for a quick check). Data:
the real Bespoke-Stratos row rendered with the student's tokenizer and chat template, its CoT
repeated until the trace is long enough, then cut to the wanted length. Memory: peak RSS above
a baseline on CPU (VmHWM, reset through /proc/self/clear_refs, after malloc_trim hands freed
pages back), the CUDA allocator's peak above a baseline on GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_ROW = REPO / "tests" / "fixtures" / "records" / "real_bespoke_stratos_row.jsonl"
QWEN3_TOKENIZER = REPO / "tests" / "fixtures" / "tokenizers" / "qwen3"
GIB = 1024**3
RESULT = "RESULT "

# Published shapes (config.json of Qwen/Qwen3-1.7B and Qwen/Qwen3-4B); weights are random.
QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, num_key_value_heads=8,
             tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1000000.0)
PRESETS = {
    "qwen3-1.7b": dict(QWEN3, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       intermediate_size=6144),
    "qwen3-4b": dict(QWEN3, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     intermediate_size=9728),
    # A quick check of the whole path on a CPU: same vocabulary, toy depth and width.
    "tiny-student": dict(QWEN3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128),
    "tiny-teacher": dict(QWEN3, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=24, intermediate_size=192),
}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", choices=("smollm2", "random"), default="smollm2",
                        help="smollm2: the real SmolLM2-135M-Instruct teacher and a layer-dropped "
                        "student; random: random-init models of --student/--teacher dimensions")
    parser.add_argument("--keep-every", type=int, default=3,
                        help="smollm2 student: keep every k-th teacher layer (default 3: 11 of 30)")
    parser.add_argument("--cache-dir", default=None,
                        help="essence cache holding SmolLM2 (default $ESSENCE_CACHE or ~/.cache/essence; "
                        "the tests use .pytest_cache/d/essence)")
    parser.add_argument("--student", default="qwen3-1.7b",
                        help=f"random student: a preset ({', '.join(PRESETS)}) or a JSON object of config fields")
    parser.add_argument("--teacher", default="qwen3-4b", help="random teacher: preset or JSON, as --student")
    parser.add_argument("--tokenizer", default=str(QWEN3_TOKENIZER),
                        help="random models: the tokenizer that renders the trace (default: the Qwen3 fixture)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="float32: everything fp32; bfloat16: bf16 mixed precision as essence trains "
                        "on GPU (student fp32 weights under bf16 autocast, teacher weights in bf16)")
    parser.add_argument("--chunk", type=int, default=1024, help="essence: tokens per chunk of the fused loss")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 steadies timings on cores "
                        "shared with other work, where one descheduled thread stalls its partner")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the variants")


def dims(spec: str) -> dict:
    if spec in PRESETS:
        return dict(PRESETS[spec])
    try:
        fields = json.loads(spec)
    except json.JSONDecodeError:
        sys.exit(f"--student/--teacher {spec!r} is neither a preset ({', '.join(PRESETS)}) nor JSON")
    return dict(QWEN3, **fields)


def forward_worker_args(args: argparse.Namespace) -> list[str]:
    """The shared options, as command-line arguments for a worker subprocess."""
    out = ["--models", args.models, "--keep-every", str(args.keep_every), "--student", args.student,
           "--teacher", args.teacher, "--tokenizer", args.tokenizer, "--device", args.device,
           "--dtype", args.dtype, "--chunk", str(args.chunk)]
    out += ["--threads", str(args.threads)] if args.threads else []
    return out + (["--cache-dir", args.cache_dir] if args.cache_dir else [])


# ---------------------------------------------------------------------------------------------
# Models


def load_models(args: argparse.Namespace):
    """(student, teacher, tokenizer) on args.device; identical weights in every process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    if args.models == "smollm2":
        from transformers import AutoModelForCausalLM

        from essence.models.fetch import fetch_smollm2
        from essence.models.layers import drop_layers
        from essence.models.loading import load_tokenizer

        path = fetch_smollm2(Path(args.cache_dir) if args.cache_dir else None)
        tokenizer = load_tokenizer(str(path))
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        student = drop_layers(teacher, keep_every=args.keep_every)
        teacher = teacher.to(device, teacher_dtype)
        student = student.to(device)
    else:
        from essence.models.loading import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        student = random_model(dims(args.student), device, torch.float32, seed=0)
        teacher = random_model(dims(args.teacher), device, teacher_dtype, seed=1)
    student.config.use_cache = False
    teacher.eval().requires_grad_(False)
    return student.train(), teacher, tokenizer


def random_model(fields: dict, device, dtype, seed: int):
    """A random-init causal LM built directly on `device` (a 4B model inits in seconds on a GPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


# ---------------------------------------------------------------------------------------------
# Data


def trace(tokenizer, length: int | None = None, cot_repeats: int = 1):
    """A rendered reasoning trace: the real Bespoke-Stratos row with its CoT repeated `cot_repeats`
    times; with `length`, repeated as often as needed and cut after exactly `length` tokens.
    Returns (Rendered, Spans); a cut trace's spans end at the cut."""
    from essence.data.records import read_records
    from essence.data.render import Spans, render

    [record] = read_records(str(REAL_ROW)).records

    def rendered_with(repeats: int):
        return render(replace(record, cot="\n\n".join([record.cot] * repeats)), tokenizer)

    rendered = rendered_with(cot_repeats)
    if length is None:
        return rendered, rendered.spans
    while len(rendered.input_ids) < length:
        cot_repeats += 1
        rendered = rendered_with(cot_repeats)
    s = rendered.spans
    clip = lambda span: (min(span[0], length), min(span[1], length))
    think_end = s.think_end if s.think_end is not None and s.think_end <= length else None
    spans = Spans(clip(s.prompt), clip(s.cot), clip(s.answer), think_end)
    return replace(rendered, input_ids=rendered.input_ids[:length], spans=spans), spans


def example(rendered, spans, lsp: float = 1.0):
    """The training example essence makes of a trace at this LSP (default supervision: all segments)."""
    from essence.data.pipeline import DataConfig, to_example
    from essence.data.truncation import TruncationConfig, truncate

    return to_example(rendered, truncate(spans, TruncationConfig(lsp=lsp)), DataConfig())


# ---------------------------------------------------------------------------------------------
# essence's optimizer step


class EssenceStep:
    """One optimizer step as essence.train.loop's Trainer takes it: DistillStep (the fused chunked
    loss), loss normalised once over all micro-batches, accelerate backward, clip, AdamW."""

    def __init__(self, student, teacher, tokenizer, args: argparse.Namespace, kd_ratio: float = 0.5):
        import torch

        from essence.config.schema import LossConfig, TrainConfig
        from essence.models.runtime import make_accelerator
        from essence.teacher.sources import OnlineTeacher
        from essence.train.setup import build_optimizer
        from essence.train.step import DistillStep

        precision = "bf16" if args.dtype == "bfloat16" else "no"
        self.train_config = TrainConfig(mixed_precision=precision, max_grad_norm=1.0)
        self.accelerator = make_accelerator(self.train_config)
        # make_accelerator asks for deterministic kernels off GPU: measure what a real run does.
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.loss = LossConfig(kd_ratio=kd_ratio, divergence="forward_kl", chunk_size=args.chunk)
        module = DistillStep(student, self.loss, len(tokenizer))
        optimizer, scheduler = build_optimizer(student, self.train_config, total_steps=1000)
        self.module, self.optimizer, self.scheduler = self.accelerator.prepare(module, optimizer, scheduler)
        self.teacher = OnlineTeacher(teacher, self.accelerator.device)

    def __call__(self, batches) -> float:
        from essence.train.step import combine, loss_weights, step_token_counts

        n_nll, n_kd = step_token_counts(batches)
        weights = loss_weights(n_nll, n_kd, self.loss.kd_ratio)
        total = 0.0
        for batch in batches:
            batch = batch.to(self.accelerator.device)
            teacher = self.teacher(batch.input_ids, batch.attention_mask)
            out = self.module(batch.input_ids, batch.attention_mask, batch.nll_mask, batch.kd_mask,
                              teacher, weights)
            loss = combine(out, weights)
            self.accelerator.backward(loss)
            total += float(loss.detach())
        self.accelerator.clip_grad_norm_(self.module.parameters(), self.train_config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total


# ---------------------------------------------------------------------------------------------
# Memory and time


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM, ...), in KiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


class Meter:
    """Peak memory and time of one step, above the memory in use just before it.

    CPU: freed heap pages are handed back first (malloc_trim), then VmHWM is reset to the
    current RSS, so the step's peak minus the RSS before it is what the step itself touched.
    CUDA: max_memory_allocated after a reset, minus memory_allocated before the step.
    """

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.baseline = self.current()  # models and data loaded, nothing trained yet

    def current(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        return status_kib("VmRSS") * 1024

    def start(self) -> None:
        import torch

        self.before = self.current()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.t0
        peak = torch.cuda.max_memory_allocated() if self.cuda else status_kib("VmHWM") * 1024
        return {"seconds": seconds, "step_mem": peak - self.before, "peak_mem": peak - self.baseline,
                "peak_abs": peak}


def run_worker(script: str, argv: list[str]) -> dict:
    """Run `script --worker ...` in a fresh Python process and return its RESULT line."""
    out = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    if out.returncode != 0 or not lines:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-25:])
        return {"error": f"worker {' '.join(argv[:2])} exited {out.returncode}:\n{tail}"}
    return json.loads(lines[-1][len(RESULT):])


def report(result: dict) -> None:
    """A worker's last line: the result as JSON after a marker (other output may precede it)."""
    print(RESULT + json.dumps(result), flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def environment(args: argparse.Namespace) -> str:
    import os
    import platform

    import torch

    where = f"{os.cpu_count()} CPU cores, {args.threads or torch.get_num_threads()} torch threads"
    if args.device == "cuda" and torch.cuda.is_available():
        where = torch.cuda.get_device_name(0)
    return f"{where}; torch {torch.__version__}; Python {platform.python_version()}"


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"
