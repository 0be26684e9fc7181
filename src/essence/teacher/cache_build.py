"""Build a teacher cache: render the data as training does, one teacher pass per whole sequence.

`essence teacher cache CONFIG --out DIR` renders the experiment's records (same reader, chat
template, spans and max_length as `essence train`), runs the teacher once over each whole
sequence and writes its sparse targets (essence.teacher.cache_format). Records are grouped into shards
of a fixed size; a shard is written to a temporary file and renamed when complete, then its
index is written beside it, so a killed build resumes at the first incomplete shard and produces
the same bytes as an uninterrupted one (the teacher sees the same batches either way). The
manifest is written last: until it exists, nothing reads the folder as a cache. Ctrl-C or
SIGTERM stops after the current batch (finished shards are kept); a full disk is one line; the
folder is locked while a build writes it; building over a complete cache checks every shard and
redoes the damaged ones. Under `accelerate launch`, process i builds shards i, i + n, ...; the
main process writes the manifest.

What turns sequences into targets is a `TeacherPass` (essence.teacher.teacher_pass).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import torch

from essence.errors import EssenceError
from essence.faults import fault_point
from essence.io import (
    FolderLock,
    check_free_space,
    check_out_dir,
    write_failure,
    write_json_atomic,
)
from essence.stopping import Stopped, StopRequest
from essence.teacher.cache_format import (
    BUILD_STATE,
    FORMAT,
    MANIFEST,
    CacheSettings,
    RecordTargets,
    describe_differences,
    encode,
    fingerprint,
    manifest_digest,
    manifest_problem,
    resolve_cache_dir,
    row_bytes,
    shard_problem,
    token_digest,
)
from essence.teacher.teacher_pass import TeacherPass, TorchTeacherPass

__all__ = ["TeacherPass", "TorchTeacherPass", "build_cache", "ensure_cache", "cache_settings",
           "add_parser"]


def _write_shard(out: Path, index: int, records, targets: list[RecordTargets],
                 settings: CacheSettings, vocab: int, seconds: float) -> dict:
    """Write shard `index` (.bin renamed into place, then its .json index); returns the index."""
    name = f"shard-{index:05d}.bin"
    tmp = out / f".{name}.tmp"
    entries, offset = [], 0
    try:
        with tmp.open("wb") as handle:
            fault_point(f"write-{name}")
            for rendered, target in zip(records, targets):
                blob = encode(target, settings, vocab)
                handle.write(blob)
                entries.append({"id": rendered.record_id, "tokens": len(rendered.input_ids),
                                "tokens_sha1": token_digest(rendered.input_ids), "shard": name,
                                "offset": offset, "bytes": len(blob), "crc32": zlib.crc32(blob)})
                offset += len(blob)
        os.replace(tmp, out / name)
    except OSError as err:
        raise EssenceError(f"{write_failure(out / name, err)}; the shards finished before it are "
                           "kept. Free disk space, then run the same command to resume") from None
    finally:
        tmp.unlink(missing_ok=True)
    shard = {"file": name, "bytes": offset, "records": entries, "wall_time_s": seconds}
    write_json_atomic(out / f"shard-{index:05d}.json", shard)
    return shard


def _done_shard(out: Path, index: int) -> dict | None:
    """The index of shard `index` if it was completed, else None."""
    path = out / f"shard-{index:05d}.json"
    if not path.is_file():
        return None
    try:
        shard = json.loads(path.read_text())
        data = out / shard["file"]
        return shard if data.is_file() and data.stat().st_size == shard["bytes"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_json(path: Path) -> dict | None:
    """A build's own JSON file, or None when it is missing or unreadable (it is redone)."""
    try:
        found = json.loads(path.read_text())
        return found if isinstance(found, dict) else None
    except (OSError, ValueError):
        return None


def _check_out(out: Path, state: dict) -> None:
    """Refuse a folder that holds the cache (or a build) of another experiment."""
    for name in (MANIFEST, BUILD_STATE):
        found = _read_json(out / name)
        if found is None or "fingerprint" not in found:
            continue
        diffs = describe_differences(state["fingerprint"], found["fingerprint"])
        if found.get("settings") != state["settings"]:
            diffs.append(f"settings: this build {state['settings']}, folder {found.get('settings')}")
        if diffs:
            raise EssenceError(f"{out} holds a teacher cache of another experiment "
                               f"({'; '.join(diffs)}); choose another --out or delete it")


def _repair(out: Path) -> list[str]:
    """Check a complete cache's manifest and every shard; remove the manifest and each damaged
    shard so that the build redoes them. Returns what was damaged (empty: all verified)."""
    manifest = _read_json(out / MANIFEST)
    problem = "unreadable" if manifest is None else manifest_problem(manifest)
    damaged = [] if problem is None else [f"{out / MANIFEST}: {problem}"]
    for shard in (manifest or {}).get("shards", []):
        problem = shard_problem(out, shard)
        if problem is not None:
            damaged.append(problem)
            for path in (out / shard["file"], out / shard["file"].replace(".bin", ".json")):
                path.unlink(missing_ok=True)
    if damaged:
        (out / MANIFEST).unlink(missing_ok=True)
    return damaged


def _teacher(config, vocab: int, device):
    from essence.models.flops import flop_model
    from essence.models.loading import load_causal_lm, random_causal_lm
    from essence.models.runtime import DTYPES

    m = config.model
    dtype = DTYPES.get(m.teacher_dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if m.teacher_init is not None:
        model = random_causal_lm(m.teacher_init, vocab, config.train.seed + 1, dtype=dtype)
    elif m.teacher:
        model = load_causal_lm(m.teacher, dtype=dtype, role="teacher")
    else:
        raise EssenceError("a teacher cache needs a teacher: set model.teacher")
    return model, flop_model(model, vocab), str(dtype).replace("torch.", "")


def build_cache(config, out: str | Path, *, batch_size: int = 4, shard_records: int = 256,
                progress: bool = True) -> dict:
    """Build (finish, or repair) the teacher cache of `config` in `out`; returns its manifest."""
    from essence.models.loading import load_tokenizer
    from essence.models.runtime import make_accelerator

    accelerator = make_accelerator(config.train)
    m = config.model
    tokenizer = load_tokenizer(m.tokenizer or m.student)
    rendered = _unique_records(config, tokenizer)
    vocab = len(tokenizer)
    settings = cache_settings(config, vocab)
    state = {"fingerprint": fingerprint(config, tokenizer, rendered), "settings": asdict(settings)}
    out = check_out_dir(out)  # a file, below a file, read-only: one line, not a traceback
    shards = [rendered[i:i + shard_records] for i in range(0, len(rendered), shard_records)]
    lock = _claim(out, state, accelerator, shards, row_bytes(settings, vocab))
    try:
        if (out / MANIFEST).is_file():
            return json.loads((out / MANIFEST).read_text())
        model, flops, dtype = _teacher(config, vocab, accelerator.device)
        teacher_pass = TorchTeacherPass(model, settings, vocab, accelerator.device,
                                        tokenizer.pad_token_id)
        _build_shards(out, shards, teacher_pass, settings, vocab, accelerator, batch_size,
                      progress)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return {}
        return _write_manifest(out, state, len(shards), vocab, flops, dtype,
                               m.teacher or "random-init", [len(r.input_ids) for r in rendered])
    finally:
        if lock is not None:
            lock.release()


def _unique_records(config, tokenizer) -> list:
    """The experiment's records rendered as training renders them; ids must be unique."""
    from essence.data.pipeline import prepare

    rendered = prepare(config.data, tokenizer).rendered
    seen: set[str] = set()
    for r in rendered:
        if r.record_id in seen:
            raise EssenceError(f"record id {r.record_id!r} appears twice in {config.data.source}; "
                               "a teacher cache finds records by id, so ids must be unique")
        seen.add(r.record_id)
    return rendered


def _claim(out: Path, state: dict, accelerator, shards: list, per_row: int) -> FolderLock | None:
    """Refuse another experiment's cache (every process); on the main process lock the folder,
    repair a complete cache, check the free space and record the build's state."""
    _check_out(out, state)
    lock = None
    if accelerator.is_main_process:
        lock = FolderLock(out, "teacher cache build").acquire()
        try:
            for problem in _repair(out) if (out / MANIFEST).exists() else ():
                print(f"essence: teacher cache {out}: {problem}; rebuilding it")
            if not (out / MANIFEST).is_file():
                todo = [s for i, s in enumerate(shards) if _done_shard(out, i) is None]
                needed = per_row * sum(max(len(r.input_ids) - 1, 0) for s in todo for r in s)
                check_free_space(out, needed, "the teacher cache")
                write_json_atomic(out / BUILD_STATE, state)
        except BaseException:
            lock.release()
            raise
    accelerator.wait_for_everyone()  # the others see the repaired folder
    return lock


def _build_shards(out: Path, shards: list, teacher_pass, settings: CacheSettings, vocab: int,
                  accelerator, batch_size: int, progress: bool) -> None:
    """This process's shards not yet complete; Ctrl-C or SIGTERM stops after the batch."""
    from tqdm.auto import tqdm

    mine = range(accelerator.process_index, len(shards), accelerator.num_processes)
    total = sum(len(r.input_ids) for i in mine for r in shards[i])
    bar = tqdm(total=total, desc="teacher cache", unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process))
    per_shard = len(shards[0]) if shards else 0  # shard_records (only a lone shard is shorter)
    with StopRequest("after this batch (finished shards are kept)") as stop, bar:
        for i in mine:
            if _done_shard(out, i) is not None:
                bar.update(sum(len(r.input_ids) for r in shards[i]))
                continue
            started, targets = time.perf_counter(), []
            for b in range(0, len(shards[i]), batch_size):
                if stop.requested:
                    raise Stopped(_stop_message(out, len(shards)), stop.exit_code,
                                  resume="the same essence teacher cache command")
                group = shards[i][b:b + batch_size]
                base = i * per_shard + b
                targets += teacher_pass([r.input_ids for r in group],
                                        list(range(base, base + len(group))))
                bar.update(sum(len(r.input_ids) for r in group))
            _write_shard(out, i, shards[i], targets, settings, vocab, time.perf_counter() - started)


def _stop_message(out: Path, n_shards: int) -> str:
    done = sum(_done_shard(out, i) is not None for i in range(n_shards))
    return (f"stopped: {done} of {n_shards} shards of the teacher cache {out} are complete (it "
            "has no manifest yet, so nothing reads it as a cache)")


def cache_settings(config, vocab: int) -> CacheSettings:
    """The cache settings an experiment asks for (model.teacher_cache_*); top-k above the
    vocabulary is the whole vocabulary."""
    m = config.model
    k = min(m.teacher_cache_k, vocab) if m.teacher_cache_mode == "topk" else m.teacher_cache_k
    return CacheSettings(mode=m.teacher_cache_mode, k=k,
                         value_dtype=m.teacher_cache_dtype,
                         temperature=config.loss.temperature,
                         seed=config.train.seed)


def _write_manifest(out: Path, state: dict, n_shards: int, vocab: int, flops, dtype: str,
                    teacher: str, lengths: list[int]) -> dict:
    shards = [_done_shard(out, i) for i in range(n_shards)]
    missing = [i for i, s in enumerate(shards) if s is None]
    if missing:
        raise EssenceError(f"teacher cache {out}: shards {missing[:5]} did not complete; run the "
                           "same command again to finish them")
    stored = sum(s["bytes"] for s in shards)
    positions = sum(max(n - 1, 0) for n in lengths)
    seconds = sum(s.pop("wall_time_s") for s in shards)
    manifest = {
        "format": FORMAT, "fingerprint": state["fingerprint"], "settings": state["settings"],
        "vocab": vocab, "teacher": {"spec": teacher, "dtype": dtype, "params": flops.params,
                                    "head": flops.head, "layers": flops.layers,
                                    "attn_dim": flops.attn_dim},
        "records": sum(len(s["records"]) for s in shards), "tokens": sum(lengths),
        "positions": positions, "bytes": stored,
        "bytes_per_token": stored / max(positions, 1),
        "teacher_pass": {"flops": flops.forward(lengths), "wall_time_s": seconds,
                         "tokens_per_s": sum(lengths) / max(seconds, 1e-9)},
        "shards": shards,
    }
    manifest["sha256"] = manifest_digest(manifest)
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def ensure_cache(config, *, progress: bool = True) -> Path:
    """The cache folder of `config` (model.teacher_cache), building it first if it is missing:
    model.teacher_cache/<fingerprint key>/, so one folder holds one cache per fingerprint."""
    from essence.data.pipeline import prepare
    from essence.models.loading import load_tokenizer
    from essence.teacher.cache_format import fingerprint_key

    m = config.model
    tokenizer = load_tokenizer(m.tokenizer or m.student)
    fp = fingerprint(config, tokenizer, prepare(config.data, tokenizer).rendered)
    found = resolve_cache_dir(m.teacher_cache, fp)
    if found is not None:  # a cache at the root is used as it is; training checks it
        return found
    target = Path(m.teacher_cache).expanduser() / fingerprint_key(fp)
    print(f"essence: building the teacher cache {target}")
    build_cache(config, target, progress=progress)
    return target


def _cache_command(args) -> int:
    from essence.config.load import load_config

    for flag, value in (("--batch-size", args.batch_size), ("--shard-records", args.shard_records)):
        if value < 1:
            raise EssenceError(f"{flag}={value} must be at least 1")
    config = load_config(args.config, args.overrides)
    manifest = build_cache(config, args.out, batch_size=args.batch_size,
                           shard_records=args.shard_records)
    if manifest:
        built = manifest["teacher_pass"]
        print(f"teacher cache {args.out}: {manifest['records']} records, {manifest['tokens']} tokens, "
              f"{manifest['bytes_per_token']:.1f} bytes/token, teacher pass {built['flops']:.3g} "
              f"FLOPs in {built['wall_time_s']:.1f} s")
    return 0


def add_parser(sub) -> None:
    """`essence teacher cache CONFIG --out DIR` (k, mode and dtype: model.teacher_cache_*)."""
    teacher = sub.add_parser("teacher", help="precompute the teacher's targets once")
    teacher_sub = teacher.add_subparsers(dest="teacher_command", required=True)
    cache = teacher_sub.add_parser(
        "cache", help="one teacher pass over every whole sequence, stored sparse (top-k or sampled)")
    cache.add_argument("config", help="experiment YAML file (its data, template and teacher)")
    cache.add_argument("overrides", nargs="*",
                       help="dotted overrides, e.g. model.teacher_cache_k=128")
    cache.add_argument("--out", required=True, help="cache folder (a killed build resumes here)")
    cache.add_argument("--batch-size", type=int, default=4, help="sequences per teacher forward")
    cache.add_argument("--shard-records", type=int, default=256, help="records per shard file")
    cache.set_defaults(func=_cache_command)
