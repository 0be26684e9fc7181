"""Peak memory and time of the chunked distillation loss against the naive one, on CPU.

    python bench/loss_memory.py [--tokens 4096 --vocab 151936 --hidden 2560 --chunk 1024] [--small]
    python bench/loss_memory.py --device cuda --dtype bfloat16     # the same on a GPU

Variants: "naive" materializes both models' full [tokens, vocab] logits and differentiates
with autograd; "chunked" is distill_loss_sums as the training loop calls it (each sum
keeps its own gradient); "chunked+weights" passes loss_weights so the two gradients are
combined per chunk. Each variant runs one forward + backward of 0.5·NLL/N + 0.5·KD/N
(forward KL, τ = 1, every token in both masks) in a fresh subprocess, so one variant's
allocator state cannot hide another's peak. Memory "added" is the peak RSS during the
loss (VmHWM, reset through /proc/self/clear_refs) minus the RSS once the inputs (both
models' hidden states and LM heads) exist. The gradients returned for the hidden states
and the head are part of it in every variant; "working" memory leaves them out. On a GPU,
memory is the CUDA allocator's peak above what the inputs hold, and the time is taken after
one untimed pass at full size.
Targets: memory ratio ≤ 1/8, time ratio ≤ 1.2 (chunked / naive).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import status_kib  # noqa: E402

VARIANTS = ("naive", "chunked", "chunked+weights")
GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="supervised tokens in the micro-batch")
    parser.add_argument("--vocab", type=int, default=151936, help="logit width of both models")
    parser.add_argument("--hidden", type=int, default=2560, help="student hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=None,
                        help="teacher hidden size (default: --hidden)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per chunk of the chunked loss")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="of the hidden states and heads (the loss computes in fp32 either way)")
    parser.add_argument("--small", action="store_true",
                        help="a quick check: 512 tokens, vocab 16384, hidden 256, chunk 128")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.small:
        args.tokens, args.vocab, args.hidden, args.chunk = 512, 16384, 256, 128
    args.teacher_hidden = args.teacher_hidden or args.hidden
    return args


def limit_address_space() -> None:
    """Make an allocation beyond the machine's free memory fail here, not OOM-kill a neighbour."""
    with open("/proc/meminfo") as f:
        available_kib = int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1))
    limit = (status_kib("VmSize") + available_kib - 1024**2) * 1024  # leave 1 GiB to the others
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def make_inputs(args: argparse.Namespace, tokens: int, vocab: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    hidden, teacher_hidden = args.hidden, args.teacher_hidden

    def tensor(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(args.device, getattr(torch, args.dtype))

    return dict(
        student_hidden=tensor(tokens, hidden).requires_grad_(True),
        student_head=tensor(vocab, hidden, scale=hidden**-0.5).requires_grad_(True),
        teacher_hidden=tensor(tokens, teacher_hidden),
        teacher_head=tensor(vocab, teacher_hidden, scale=teacher_hidden**-0.5),
        labels=torch.randint(0, vocab, (tokens,), generator=g).to(args.device),
        nll_mask=torch.ones(tokens, dtype=torch.bool, device=args.device),
        kd_mask=torch.ones(tokens, dtype=torch.bool, device=args.device),
    )


def loss_step(variant: str, inputs: dict, chunk: int) -> float:
    """One forward + backward of the loss; returns its value."""
    from essence.loss.fused import distill_loss_sums
    from essence.loss.naive import naive_distill_loss_sums

    for name in ("student_hidden", "student_head"):
        inputs[name].grad = None
    n = inputs["labels"].numel()
    weights = (0.5 / n, 0.5 / n)
    if variant == "naive":
        nll, kd = naive_distill_loss_sums(**inputs, kind="forward_kl")
    elif variant == "chunked":
        nll, kd = distill_loss_sums(**inputs, kind="forward_kl", chunk_size=chunk)
    elif variant == "chunked+weights":
        nll, kd = distill_loss_sums(**inputs, kind="forward_kl", chunk_size=chunk, loss_weights=weights)
    loss = weights[0] * nll + weights[1] * kd
    loss.backward()
    return float(loss.detach())


def worker(args: argparse.Namespace) -> dict:
    """Measure one variant in this (fresh) process."""
    import torch

    cuda = args.device == "cuda"
    if not cuda:  # CUDA reserves more address space than memory: no limit there
        limit_address_space()
    loss_step(args.worker, make_inputs(args, 8, 64), 4)  # first-call costs (kernels, threads) off the clock
    inputs = make_inputs(args, args.tokens, args.vocab)
    try:
        if cuda:
            loss_step(args.worker, inputs, args.chunk)
            for name in ("student_hidden", "student_head"):
                inputs[name].grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        start = time.perf_counter()
        loss = loss_step(args.worker, inputs, args.chunk)
        if cuda:
            torch.cuda.synchronize()
    except (RuntimeError, MemoryError) as e:  # torch reports a failed allocation as RuntimeError
        return {"variant": args.worker, "error": str(e).splitlines()[0][:200]}
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else status_kib("VmHWM") * 1024
    grads = sum(inputs[k].grad.nbytes for k in ("student_hidden", "student_head"))
    return {"variant": args.worker, "seconds": seconds, "loss": loss, "threads": torch.get_num_threads(),
            "added": peak - base, "grads": grads}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    sizes = ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
             "--teacher-hidden", str(args.teacher_hidden), "--chunk", str(args.chunk),
             "--device", args.device, "--dtype", args.dtype]
    print(f"tokens {args.tokens}, vocab {args.vocab}, hidden {args.hidden} (teacher {args.teacher_hidden}), "
          f"chunk {args.chunk}; {args.dtype} inputs on {args.device}, forward KL, τ = 1, "
          "all tokens in both masks")
    results = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--worker", variant, *sizes],
                             capture_output=True, text=True, check=False)
        lines = out.stdout.strip().splitlines()
        if out.returncode != 0 or not lines:
            sys.exit(f"{variant} failed:\n{out.stderr[-2000:]}")
        results[variant] = r = json.loads(lines[-1])
        if "error" in r:
            print(f"{variant:>16}: failed: {r['error']} (memory is capped at what the machine "
                  "has available less 1 GiB; try fewer --tokens)")
            continue
        print(f"{variant:>16}: {r['seconds']:7.3f} s   added {r['added'] / GIB:6.2f} GiB   "
              f"working (added − gradients) {(r['added'] - r['grads']) / GIB:6.2f} GiB   "
              f"loss {r['loss']:.6f}   threads {r['threads']}")
    naive = results["naive"]
    if "error" in naive:
        return
    for variant in VARIANTS[1:]:
        r = results[variant]
        if "error" in r:
            continue
        print(f"{variant} / naive:  memory added {r['added'] / naive['added']:.3f} (target ≤ 0.125), "
              f"working {(r['added'] - r['grads']) / (naive['added'] - naive['grads']):.3f}, "
              f"time {r['seconds'] / naive['seconds']:.2f} (target ≤ 1.2)")


if __name__ == "__main__":
    main()
