"""Teacher cache: bytes per token, KD error against the dense loss, build speed, sweep cost.

Real models (default): teacher SmolLM2-135M-Instruct, student = the teacher with every third
layer kept (bench/common.py), on the real Bespoke-Stratos trace rendered with SmolLM2's template.

1. Bytes per target position for each k as essence stores it (fp16 log-probs, uint16 ids at this
   vocabulary; 3-byte ids above 65,536), measured from the cache files, and with zlib on top.
2. KD error vs k: the top-k + tail loss against the dense loss, per divergence — relative error
   of the summed value and of the gradient w.r.t. the student logits (‖g_k − g‖ / ‖g‖), on every
   `--stride`-th position of the trace. Sampled forward KL at the same bytes per token: bias
   (‖mean over draws − g‖ / ‖g‖) and noise (mean ‖g_draw − g‖ / ‖g‖).
3. Build speed: `essence teacher cache` over the trace plus the fixture records, tokens/s.
4. A 4-point LSP sweep (1, 0.75, 0.5, 0.25), one epoch each: teacher FLOPs and wall time with
   the cache (one pass at full length, then reads) vs online (a teacher forward per point).

    python bench/teacher_cache.py --threads 1 [--cache-dir .pytest_cache/d/essence]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REAL_ROW, REPO, add_common_args, load_models, trace  # noqa: E402

KS = (8, 32, 64, 128)
LSPS = (1.0, 0.75, 0.5, 0.25)
DIVERGENCES = ("forward_kl", "reverse_kl", "js", "tvd")
DISTILLKIT = {50: 114, 128: 300}  # published bytes per token of DistillKit's top-k logprob files


def build(args, tokenizer_dir: Path, data: Path, out: Path, k: int, mode: str = "topk") -> dict:
    from essence.config.load import load_config
    from essence.teacher.cache_build import build_cache

    config = load_config(None, [
        f"model.student={tokenizer_dir}", f"model.teacher={tokenizer_dir}",
        f"model.tokenizer={tokenizer_dir}", f"data.source={data}", f"model.teacher_cache_k={k}",
        f"model.teacher_cache_mode={mode}", "train.progress=false",
        f"train.cpu_threads={args.threads or 2}"])
    return build_cache(config, out, batch_size=1, shard_records=64, progress=False)


def storage(args, teacher_dir: Path, data: Path, work: Path) -> list[dict]:
    from essence.teacher.cache_format import CacheSettings, row_bytes

    rows = []
    for k in KS:
        manifest = build(args, teacher_dir, data, work / f"k{k}", k)
        raw = b"".join((work / f"k{k}" / s["file"]).read_bytes() for s in manifest["shards"])
        rows.append({"k": k, "bytes_per_token": manifest["bytes_per_token"],
                     "zlib_bytes_per_token": len(zlib.compress(raw, 6)) / manifest["positions"],
                     "qwen_vocab_bytes_per_token": row_bytes(CacheSettings(k=k), 151936),
                     "tokens_per_s": manifest["teacher_pass"]["tokens_per_s"]})
    return rows


def _value_and_grad(z_s, loss) -> tuple:
    """loss(z).sum() at the student's logits, and its gradient with respect to them."""
    z = z_s.clone().requires_grad_(True)
    value = loss(z).sum()
    value.backward()
    return float(value.detach()), z.grad


def _stored(z_t, settings, vocab: int):
    """Targets exactly as a cache stores and reads them (fp16 round trip), and bytes per token."""
    import torch

    from essence.teacher.cache_build import TorchTeacherPass
    from essence.teacher.cache_format import RecordTargets, decode, encode

    pass_ = TorchTeacherPass(torch.nn.Identity(), settings, vocab, torch.device("cpu"), 0)
    parts = pass_._topk(z_t) if settings.mode == "topk" else pass_._sampled(
        z_t, torch.Generator().manual_seed(settings.seed))
    blob = encode(RecordTargets(*parts), settings, vocab)
    return decode(blob, z_t.shape[0], settings, vocab), len(blob) / z_t.shape[0]


def _relative(value: float, grad, ref_value: float, ref_grad) -> dict:
    return {"value_rel_err": abs(value - ref_value) / abs(ref_value),
            "grad_rel_err": float((grad - ref_grad).norm() / ref_grad.norm())}


def topk_errors(z_s, z_t, vocab: int) -> list[dict]:
    """Top-k targets at each k, every divergence at tau 1 and forward KL at tau 2."""
    import numpy as np
    import torch

    from essence.loss.divergences import divergence
    from essence.loss.sparse_kd import SparseTargets, narrow_topk, sparse_divergence
    from essence.teacher.cache_format import CacheSettings

    # The cache stores p_T^tau at the experiment's tau: one top-128 cache per tau, narrowed to each k.
    tops = {tau: _stored(z_t, CacheSettings(k=max(KS), temperature=tau), vocab)[0] for tau in (1.0, 2.0)}
    out = []
    for kind, tau in [(d, 1.0) for d in DIVERGENCES] + [("forward_kl", 2.0)]:
        ref = _value_and_grad(z_s, lambda z: divergence(z, z_t, kind, temperature=tau))
        top = tops[tau]
        for k in KS:
            t_ids, t_logp, t_tail = narrow_topk(torch.from_numpy(top.ids.astype(np.int64)),
                                                torch.from_numpy(top.logp.astype(np.float32)),
                                                torch.from_numpy(top.tail.copy()), k)
            targets = SparseTargets(t_ids, t_logp, t_tail, None, tau)
            got = _value_and_grad(z_s, lambda z: sparse_divergence(z, targets, kind, temperature=tau))
            out.append({"divergence": kind, "tau": tau, "k": k, "mode": "topk",
                        "bytes_per_token": k * 4 + 4, **_relative(*got, *ref)})
    return out


def sampled_errors(z_s, z_t, vocab: int, draws: int) -> list[dict]:
    """Sampled targets at the same bytes per token as each top-k: bias of the mean, noise per draw."""
    import numpy as np
    import torch

    from essence.loss.divergences import divergence
    from essence.loss.sparse_kd import SparseTargets, sparse_divergence
    from essence.teacher.cache_format import CacheSettings

    ref_value, ref_grad = _value_and_grad(z_s, lambda z: divergence(z, z_t, "forward_kl", temperature=1.0))
    out = []
    for k in KS:
        m = max(1, (k * 4 + 4) // 5)  # the same bytes per token: 2 id + 1 count + 2 logp each
        grads, values = [], []
        for draw in range(draws):
            stored, _ = _stored(z_t, CacheSettings(mode="sampled", k=m, seed=draw), vocab)
            weights = torch.from_numpy(stored.counts.astype(np.float32))
            targets = SparseTargets(torch.from_numpy(stored.ids.astype(np.int64)),
                                    torch.from_numpy(stored.logp.astype(np.float32)), None,
                                    weights / weights.sum(1, keepdim=True), 1.0)
            value, grad = _value_and_grad(z_s, lambda z: sparse_divergence(z, targets, "forward_kl",
                                                                           temperature=1.0))
            grads.append(grad)
            values.append(value)
        mean = torch.stack(grads).mean(0)
        out.append({"divergence": "forward_kl", "tau": 1.0, "k": m, "mode": f"sampled ({draws} draws)",
                    "bytes_per_token": m * 5,
                    **_relative(sum(values) / len(values), mean, ref_value, ref_grad),
                    "grad_noise": sum(float((g - ref_grad).norm() / ref_grad.norm()) for g in grads)
                    / len(grads)})
    return out


def kd_errors(student, teacher, tokenizer, args) -> list[dict]:
    """Value and gradient error of sparse KD against dense KD on the real trace."""
    import torch

    rendered, _ = trace(tokenizer)
    ids = torch.tensor([rendered.input_ids])
    vocab = len(tokenizer)
    with torch.no_grad():
        z_s = student(ids).logits[0, :-1, :vocab].float()[::args.stride]
        z_t = teacher(ids).logits[0, :-1, :vocab].float()[::args.stride]
    return topk_errors(z_s, z_t, vocab) + sampled_errors(z_s, z_t, vocab, args.draws)


def sweep_cost(args, teacher, tokenizer, teacher_dir: Path, data: Path, work: Path) -> dict:
    """Teacher FLOPs and seconds of a 4-point LSP sweep, cached vs online (one epoch each)."""
    import torch

    from essence.config.load import load_config
    from essence.data.batching import collate
    from essence.data.pipeline import prepare
    from essence.models.flops import flop_model
    from essence.teacher.sources import CachedTeacher, OnlineTeacher

    manifest = build(args, teacher_dir, data, work / "k64", 64)  # built in storage(): reused
    vocab = len(tokenizer)
    flops = flop_model(teacher, vocab)
    online_teacher = OnlineTeacher(teacher, torch.device("cpu"))
    result = {"cache_pass_flops": manifest["teacher_pass"]["flops"],
              "cache_pass_s": manifest["teacher_pass"]["wall_time_s"], "points": []}
    for lsp in LSPS:
        config = load_config(None, [
            f"model.student={teacher_dir}", f"model.teacher={teacher_dir}",
            f"model.tokenizer={teacher_dir}", f"data.source={data}", f"data.truncation.lsp={lsp}",
            f"model.teacher_cache={work / 'k64'}", "model.teacher_cache_k=64"])
        prepared = prepare(config.data, tokenizer)
        cached = CachedTeacher(config, torch.device("cpu"))
        examples, _ = cached.bind(tokenizer, prepared, prepared.examples, [])
        batches = [collate([e], tokenizer.pad_token_id) for e in examples]
        lengths = [len(e) for e in examples]
        started = time.perf_counter()
        for b in batches:
            online_teacher(b.input_ids, b.attention_mask)
        online_s = time.perf_counter() - started
        started = time.perf_counter()
        for b in batches:
            cached(b.input_ids, b.attention_mask, b.record_ids)
        read_s = time.perf_counter() - started
        result["points"].append({"lsp": lsp, "tokens": sum(lengths),
                                 "online_flops": flops.forward(lengths, [n - 1 for n in lengths]),
                                 "online_s": online_s, "cache_read_s": read_s})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--stride", type=int, default=4, help="KD error on every n-th position")
    parser.add_argument("--draws", type=int, default=8, help="sampled caches drawn per k")
    args = parser.parse_args()
    if args.models != "smollm2":
        sys.exit("this bench measures the real SmolLM2 teacher: --models smollm2")
    student, teacher, tokenizer = load_models(args)
    from essence.models.fetch import fetch_smollm2

    teacher_dir = fetch_smollm2(Path(args.cache_dir) if args.cache_dir else None)
    fixtures = REPO / "tests" / "fixtures" / "records"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data.jsonl"
        data.write_text("".join((fixtures / n).read_text() for n in
                                ("bespoke_stratos.jsonl", "openr1_messages.jsonl", "flat_columns.jsonl"))
                        + REAL_ROW.read_text())
        started = time.perf_counter()
        results = {"storage": storage(args, teacher_dir, data, work)}
        results["kd_error"] = kd_errors(student, teacher.float(), tokenizer, args)
        results["sweep"] = sweep_cost(args, teacher, tokenizer, teacher_dir, data, work)
        results["bench_s"] = time.perf_counter() - started
    report(results)


def report(results: dict) -> None:
    print("\nbytes per target position (SmolLM2, vocab 49,152: uint16 ids, fp16 log-probs)")
    print(f"{'k':>5} {'essence':>8} {'+zlib':>7} {'Qwen vocab':>10} {'DistillKit':>10} {'build tok/s':>12}")
    for r in results["storage"]:
        dk = DISTILLKIT.get(r["k"], "")
        print(f"{r['k']:>5} {r['bytes_per_token']:>8.1f} {r['zlib_bytes_per_token']:>7.1f} "
              f"{r['qwen_vocab_bytes_per_token']:>10} {dk:>10} {r['tokens_per_s']:>12.0f}")
    print("  DistillKit (published): 114 bytes/token at k=50, 300 at k=128")
    print("\nKD error vs k (relative to the dense loss; SmolLM2 teacher, layer-dropped student)")
    print(f"{'divergence':>12} {'τ':>4} {'mode':>20} {'k/m':>5} {'B/tok':>6} {'value err':>10} "
          f"{'grad err':>9} {'grad noise':>10}")
    for r in results["kd_error"]:
        noise = f"{r['grad_noise']:.4f}" if "grad_noise" in r else "-"
        print(f"{r['divergence']:>12} {r['tau']:>4g} {r['mode']:>20} {r['k']:>5} "
              f"{r['bytes_per_token']:>6} {r['value_rel_err']:>10.2e} {r['grad_rel_err']:>9.4f} "
              f"{noise:>10}")
    s = results["sweep"]
    online_flops = sum(p["online_flops"] for p in s["points"])
    online_s = sum(p["online_s"] for p in s["points"])
    reads = sum(p["cache_read_s"] for p in s["points"])
    print("\n4-point LSP sweep, one epoch each: teacher cost")
    print(f"{'LSP':>5} {'tokens':>7} {'online FLOPs':>13} {'online s':>9} {'cache read s':>13}")
    for p in s["points"]:
        print(f"{p['lsp']:>5} {p['tokens']:>7} {p['online_flops']:>13.3g} {p['online_s']:>9.2f} "
              f"{p['cache_read_s']:>13.3f}")
    print(f"online total: {online_flops:.3g} FLOPs, {online_s:.1f} s; cached: one pass "
          f"{s['cache_pass_flops']:.3g} FLOPs, {s['cache_pass_s']:.1f} s + reads {reads:.2f} s "
          f"→ FLOPs ratio {s['cache_pass_flops'] / online_flops:.2f}, time ratio "
          f"{(s['cache_pass_s'] + reads) / online_s:.2f}")
    print(f"\nRESULT {json.dumps(results)}")


if __name__ == "__main__":
    main()
