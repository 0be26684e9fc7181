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


def kd_errors(student, teacher, tokenizer, args) -> list[dict]:
    """Value and gradient error of sparse KD against dense KD on the real trace."""
    import numpy as np
    import torch

    from essence.loss.divergences import divergence
    from essence.loss.sparse_kd import SparseTargets, narrow_topk, sparse_divergence
    from essence.teacher.cache_build import TorchTeacherPass
    from essence.teacher.cache_format import CacheSettings, decode, encode

    rendered, _ = trace(tokenizer)
    ids = torch.tensor([rendered.input_ids])
    vocab = len(tokenizer)
    with torch.no_grad():
        z_s = student(ids).logits[0, :-1, :vocab].float()[::args.stride]
        z_t = teacher(ids).logits[0, :-1, :vocab].float()[::args.stride]
    rows_n = z_s.shape[0]

    def stored(settings: CacheSettings):
        """Targets exactly as a cache stores and reads them (fp16 round trip)."""
        pass_ = TorchTeacherPass(torch.nn.Identity(), settings, vocab, torch.device("cpu"), 0)
        parts = pass_._topk(z_t) if settings.mode == "topk" else pass_._sampled(
            z_t, torch.Generator().manual_seed(settings.seed))
        from essence.teacher.cache_format import RecordTargets

        blob = encode(RecordTargets(*parts), settings, vocab)
        return decode(blob, rows_n, settings, vocab), len(blob) / rows_n

    def dense(kind, tau=1.0):
        z = z_s.clone().requires_grad_(True)
        value = divergence(z, z_t, kind, temperature=tau).sum()
        value.backward()
        return float(value.detach()), z.grad

    def sparse(targets, kind, tau=1.0):
        z = z_s.clone().requires_grad_(True)
        value = sparse_divergence(z, targets, kind, temperature=tau).sum()
        value.backward()
        return float(value.detach()), z.grad

    # The cache stores p_T^τ at the experiment's τ: one top-128 cache per τ, narrowed to each k.
    tops = {tau: stored(CacheSettings(k=max(KS), temperature=tau))[0] for tau in (1.0, 2.0)}
    out = []
    for kind, tau in [(d, 1.0) for d in DIVERGENCES] + [("forward_kl", 2.0)]:
        ref_value, ref_grad = dense(kind, tau)
        top = tops[tau]
        for k in KS:
            t_ids, t_logp, t_tail = narrow_topk(torch.from_numpy(top.ids.astype(np.int64)),
                                                torch.from_numpy(top.logp.astype(np.float32)),
                                                torch.from_numpy(top.tail.copy()), k)
            value, grad = sparse(SparseTargets(t_ids, t_logp, t_tail, None, tau), kind, tau)
            out.append({"divergence": kind, "tau": tau, "k": k, "mode": "topk",
                        "bytes_per_token": k * 4 + 4,
                        "value_rel_err": abs(value - ref_value) / abs(ref_value),
                        "grad_rel_err": float((grad - ref_grad).norm() / ref_grad.norm())})
    ref_value, ref_grad = dense("forward_kl")
    for k in KS:
        m = max(1, (k * 4 + 4) // 5)  # the same bytes per token: 2 id + 1 count + 2 logp each
        grads, values = [], []
        for draw in range(args.draws):
            targets, _ = stored(CacheSettings(mode="sampled", k=m, seed=draw))
            weights = torch.from_numpy(targets.counts.astype(np.float32))
            value, grad = sparse(SparseTargets(
                torch.from_numpy(targets.ids.astype(np.int64)),
                torch.from_numpy(targets.logp.astype(np.float32)), None,
                weights / weights.sum(1, keepdim=True), 1.0), "forward_kl")
            grads.append(grad)
            values.append(value)
        mean = torch.stack(grads).mean(0)
        out.append({"divergence": "forward_kl", "tau": 1.0, "k": m, "mode": f"sampled ({args.draws} draws)",
                    "bytes_per_token": m * 5,
                    "value_rel_err": abs(sum(values) / len(values) - ref_value) / abs(ref_value),
                    "grad_rel_err": float((mean - ref_grad).norm() / ref_grad.norm()),
                    "grad_noise": sum(float((g - ref_grad).norm() / ref_grad.norm()) for g in grads)
                    / len(grads)})
    return out


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
