"""Build a teacher cache: render the data as training does, one teacher pass per whole sequence.

`essence teacher cache CONFIG --out DIR` renders the experiment's records (same reader, chat
template, spans and max_length as `essence train`), runs the teacher once over each whole
sequence and writes its sparse targets (essence.teacher.cache_format). Records are grouped into shards
of a fixed size; a shard is written to a temporary file and renamed when complete, then its
index is written beside it, so a killed build resumes at the first incomplete shard and produces
the same bytes as an uninterrupted one (the teacher sees the same batches either way). Under
`accelerate launch`, process i builds shards i, i + n, ...; the main process writes the manifest.

What turns sequences into targets is a `TeacherPass`; `TorchTeacherPass` (a transformers model)
is the one here, so another backend (e.g. vLLM prompt log-probs) plugs in beside it.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from essence.errors import EssenceError
from essence.io import write_json_atomic
from essence.teacher.cache_format import (
    BUILD_STATE,
    FORMAT,
    MANIFEST,
    CacheSettings,
    RecordTargets,
    describe_differences,
    encode,
    fingerprint,
    resolve_cache_dir,
    token_digest,
)


class TeacherPass(Protocol):
    """Turns whole token sequences into per-position sparse targets (rows = tokens − 1)."""

    def __call__(self, sequences: list[list[int]], ordinals: list[int]) -> list[RecordTargets]: ...


class TorchTeacherPass:
    """A transformers causal LM run over right-padded batches; top-k or sampled targets per row,
    the LM head applied `chunk` positions at a time so memory stays O(chunk × vocab)."""

    def __init__(self, model: torch.nn.Module, settings: CacheSettings, vocab: int, device,
                 pad_id: int, chunk: int = 256):
        self.model = model.to(device).eval().requires_grad_(False)
        self.settings, self.vocab, self.device, self.pad_id = settings, vocab, device, pad_id
        self.chunk = chunk

    @torch.no_grad()
    def __call__(self, sequences: list[list[int]], ordinals: list[int]) -> list[RecordTargets]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
        body = self.model.get_decoder()
        hidden = body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                      use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings().weight[:self.vocab].float()
        return [self._targets(hidden[row, :len(seq) - 1], head, ordinal)
                for row, (seq, ordinal) in enumerate(zip(sequences, ordinals))]

    def _targets(self, hidden: torch.Tensor, head: torch.Tensor, ordinal: int) -> RecordTargets:
        """hidden: [rows, H] of one record → its targets (numpy, fp32 values)."""
        s, parts = self.settings, []
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + ordinal)
        for start in range(0, hidden.shape[0], self.chunk):
            logits = hidden[start:start + self.chunk].float() @ head.T
            parts.append(self._topk(logits) if s.mode == "topk" else self._sampled(logits, generator))
        k = s.k
        if not parts:
            empty = np.zeros((0, k), np.float32)
            topk = s.mode == "topk"
            return RecordTargets(empty.astype(np.int64), empty, np.zeros(0, np.float32) if topk else None,
                                 None if topk else empty.astype(np.uint8))
        cat = [np.concatenate(p) if p[0] is not None else None for p in zip(*parts)]
        return RecordTargets(*cat)

    def _topk(self, logits: torch.Tensor):
        logp = torch.log_softmax(logits / self.settings.temperature, dim=-1)
        top, ids = logp.topk(min(self.settings.k, logp.shape[1]), dim=-1)
        tail = torch.logsumexp(logp.scatter_(1, ids, -torch.inf), dim=-1)  # exact, −inf if empty
        return ids.cpu().numpy(), top.cpu().numpy(), tail.cpu().numpy(), None

    def _sampled(self, logits: torch.Tensor, generator: torch.Generator):
        s = self.settings
        logp = torch.log_softmax(logits / s.temperature, dim=-1)
        draws = torch.multinomial(logp.exp().cpu(), s.k, replacement=True, generator=generator)
        counts = torch.zeros(logp.shape, dtype=torch.int16).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=torch.int16))
        top_counts, ids = counts.topk(s.k, dim=-1)  # distinct ids first, padding (count 0) after
        return (ids.numpy(), logp.cpu().gather(1, ids).numpy(), None,
                top_counts.to(torch.uint8).numpy())


def _write_shard(out: Path, index: int, records, targets: list[RecordTargets],
                 settings: CacheSettings, vocab: int, seconds: float) -> dict:
    """Write shard `index` (.bin renamed into place, then its .json index); returns the index."""
    name = f"shard-{index:05d}.bin"
    tmp = out / f".{name}.tmp"
    entries, offset = [], 0
    with tmp.open("wb") as handle:
        for rendered, target in zip(records, targets):
            blob = encode(target, settings, vocab)
            handle.write(blob)
            entries.append({"id": rendered.record_id, "tokens": len(rendered.input_ids),
                            "tokens_sha1": token_digest(rendered.input_ids), "shard": name,
                            "offset": offset, "bytes": len(blob), "crc32": zlib.crc32(blob)})
            offset += len(blob)
    os.replace(tmp, out / name)
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
    except ValueError:
        return None
    data = out / shard["file"]
    return shard if data.is_file() and data.stat().st_size == shard["bytes"] else None


def _check_out(out: Path, state: dict) -> bool:
    """True when out already holds this complete cache; refuses one of another experiment."""
    for name in (MANIFEST, BUILD_STATE):
        path = out / name
        if not path.is_file():
            continue
        found = json.loads(path.read_text())
        diffs = describe_differences(state["fingerprint"], found["fingerprint"])
        if found["settings"] != state["settings"]:
            diffs.append(f"settings: this build {state['settings']}, folder {found['settings']}")
        if diffs:
            raise EssenceError(f"{out} holds a teacher cache of another experiment "
                               f"({'; '.join(diffs)}); choose another --out or delete it")
        if name == MANIFEST:
            return True
    return False


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
    """Build (or finish) the teacher cache of `config` in `out`; returns its manifest."""
    from tqdm.auto import tqdm

    from essence.data.pipeline import prepare
    from essence.models.loading import load_tokenizer
    from essence.models.runtime import make_accelerator

    accelerator = make_accelerator(config.train)
    m = config.model
    tokenizer = load_tokenizer(m.tokenizer or m.student)
    rendered = prepare(config.data, tokenizer).rendered
    seen: set[str] = set()
    for r in rendered:
        if r.record_id in seen:
            raise EssenceError(f"record id {r.record_id!r} appears twice in {config.data.source}; "
                               "a teacher cache finds records by id, so ids must be unique")
        seen.add(r.record_id)
    vocab = len(tokenizer)
    settings = cache_settings(config, vocab)
    state = {"fingerprint": fingerprint(config, tokenizer, rendered), "settings": asdict(settings)}
    from essence.io import check_out_dir

    out = check_out_dir(out)  # a file, below a file, read-only: one line, not a traceback
    if _check_out(out, state):
        return json.loads((out / MANIFEST).read_text())
    if accelerator.is_main_process:
        write_json_atomic(out / BUILD_STATE, state)
    model, flops, dtype = _teacher(config, vocab, accelerator.device)
    teacher_pass = TorchTeacherPass(model, settings, vocab, accelerator.device, tokenizer.pad_token_id)
    shards = [rendered[i:i + shard_records] for i in range(0, len(rendered), shard_records)]
    mine = range(accelerator.process_index, len(shards), accelerator.num_processes)
    total = sum(len(r.input_ids) for i in mine for r in shards[i])
    bar = tqdm(total=total, desc="teacher cache", unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process))
    for i in mine:
        tokens = sum(len(r.input_ids) for r in shards[i])
        if _done_shard(out, i) is None:
            started = time.perf_counter()
            base = i * shard_records
            targets = []
            for b in range(0, len(shards[i]), batch_size):
                group = shards[i][b:b + batch_size]
                targets += teacher_pass([r.input_ids for r in group],
                                        list(range(base + b, base + b + len(group))))
                bar.update(sum(len(r.input_ids) for r in group))
            _write_shard(out, i, shards[i], targets, settings, vocab, time.perf_counter() - started)
        else:
            bar.update(tokens)
    bar.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    return _write_manifest(out, state, len(shards), vocab, flops, dtype, m.teacher or "random-init",
                           [len(r.input_ids) for r in rendered])


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
