"""The teacher cache on disk: its format, its fingerprint, and reading it back safely.

A cache holds, for every record of an experiment's data rendered exactly as training renders it,
the teacher's sparse targets at every target position of the *whole* sequence (row r is the
teacher's distribution over token r + 1 given tokens 0..r). Attention is causal, so these rows
are also the teacher's outputs for every lead span: one cache serves every LSP of a sweep.

Layout of a cache folder (built by essence.teacher.cache_build, `essence teacher cache`):

    DIR/manifest.json      written last: fingerprint, settings, teacher pass FLOPs and time,
                           and every record's shard, offset, size, CRC and token checksum;
                           its own sha256 (of the rest) in "sha256"
    DIR/build.json         the fingerprint and settings a build started with (resume check)
    DIR/shard-00000.bin    record blobs back to back
    DIR/shard-00000.json   that shard's index, written once the shard is complete

One record's blob, rows = tokens − 1, little-endian:
top-k:   ids [rows, k] (2 bytes when the vocabulary fits, else 3), log p_T^τ [rows, k]
         (float16 or float32, sorted descending), log tail mass [rows] float32
sampled: ids [rows, m], counts [rows, m] uint8 (0 = padding), log p_T^τ [rows, m]
Bytes per target position: k·(2 + 2) + 4 at float16 with a vocabulary ≤ 65,536.

Everything read back is checked before use: the manifest against its checksum, each shard's
size, and each record's bytes against its CRC. A damaged cache is refused in one line naming
the file and the command that rebuilds it, which redoes only the damaged shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from essence.errors import EssenceError

FORMAT = 1
MANIFEST = "manifest.json"
BUILD_STATE = "build.json"
CacheMode = Literal["topk", "sampled"]
ValueDtype = Literal["float16", "float32"]


@dataclass(frozen=True)
class CacheSettings:
    """What a cache stores per position; part of its identity beside the fingerprint."""

    mode: CacheMode = "topk"
    k: int = 64
    """Top-k: ids kept per position. Sampled: tokens drawn per position (at most 255)."""
    value_dtype: ValueDtype = "float16"
    temperature: float = 1.0
    """The τ of p_T^τ stored (top-k) or drawn from (sampled): the experiment's loss.temperature."""
    seed: int = 0
    """Sampled only: seed of the draws (per record: seed and record ordinal)."""


@dataclass
class RecordTargets:
    """One record's sparse targets. ids, logp: [rows, k]; tail: [rows] (top-k) or None;
    counts: [rows, k] uint8 (sampled) or None."""

    ids: np.ndarray
    logp: np.ndarray
    tail: np.ndarray | None
    counts: np.ndarray | None


def id_bytes(vocab: int) -> int:
    """Bytes per stored token id: 2 up to 65,536 tokens, else 3 (Qwen's 151,936 fits in 24 bits)."""
    return 2 if vocab <= 2**16 else 3


def _pack_ids(ids: np.ndarray, vocab: int) -> bytes:
    if id_bytes(vocab) == 2:
        return np.ascontiguousarray(ids, dtype="<u2").tobytes()
    return np.ascontiguousarray(ids, dtype="<u4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()


def _unpack_ids(raw: np.ndarray, shape: tuple[int, int], vocab: int) -> np.ndarray:
    if id_bytes(vocab) == 2:
        return raw.view("<u2").reshape(shape)
    wide = np.zeros((raw.size // 3, 4), np.uint8)
    wide[:, :3] = raw.reshape(-1, 3)
    return wide.view("<u4").reshape(shape)


def _value_dtype(settings: CacheSettings) -> np.dtype:
    return np.dtype("<f2") if settings.value_dtype == "float16" else np.dtype("<f4")


def row_bytes(settings: CacheSettings, vocab: int) -> int:
    """Bytes one target position takes."""
    per_id = id_bytes(vocab) + _value_dtype(settings).itemsize
    return settings.k * per_id + (4 if settings.mode == "topk" else settings.k)


def encode(targets: RecordTargets, settings: CacheSettings, vocab: int) -> bytes:
    parts = [targets.logp.astype(_value_dtype(settings))]
    if settings.mode == "topk":
        parts.append(targets.tail.astype("<f4"))
    else:
        parts.insert(0, targets.counts.astype(np.uint8))
    return _pack_ids(targets.ids, vocab) + b"".join(np.ascontiguousarray(p).tobytes() for p in parts)


def decode(blob: bytes | memoryview, rows: int, settings: CacheSettings, vocab: int) -> RecordTargets:
    """The arrays of one blob (read-only views into it)."""
    k, offset = settings.k, 0

    def take(dtype, shape):
        nonlocal offset
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        out = np.frombuffer(blob, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += count * dtype.itemsize
        return out

    ids = _unpack_ids(take(np.uint8, (rows * k * id_bytes(vocab),)), (rows, k), vocab)
    counts = take(np.uint8, (rows, k)) if settings.mode == "sampled" else None
    logp = take(_value_dtype(settings), (rows, k))
    tail = take("<f4", (rows,)) if settings.mode == "topk" else None
    return RecordTargets(ids, logp, tail, counts)


# ---------------------------------------------------------------------------------------------
# Identity


def token_digest(input_ids: list[int]) -> str:
    """A short checksum of a rendered sequence's token ids."""
    return hashlib.sha1(np.asarray(input_ids, dtype="<i4").tobytes()).hexdigest()[:16]


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:16]


def teacher_identity(model_config, seed: int) -> str:
    """The teacher's weights, as a checksum: of its weight files, or of its random-init recipe."""
    from essence.paths import resolve

    if model_config.teacher_init is not None:
        recipe = json.dumps({"init": model_config.teacher_init, "seed": seed + 1}, sort_keys=True)
        return f"random-init sha256:{_sha(recipe)}"
    spec = model_config.teacher
    path = Path(resolve(spec)).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # not downloaded: nothing local to hash
            return f"hub {spec} (weights not found locally, not hashed)"
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return f"weights sha256:{digest.hexdigest()[:16]}"


def render_settings(data_config) -> dict:
    """The data settings that decide which token sequences exist (not how they are cut)."""
    settings = asdict(data_config)
    for key in ("truncation", "supervision", "val_fraction", "on_error", "packing"):
        settings.pop(key, None)
    return settings


def fingerprint(config, tokenizer, rendered) -> dict[str, str]:
    """What a cache must agree with an experiment on, one readable entry per part."""
    from essence.data.render import resolve_template

    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab_text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    records = "\n".join(f"{r.record_id}\t{token_digest(r.input_ids)}" for r in rendered)
    return {
        "teacher": teacher_identity(config.model, config.train.seed),
        "tokenizer": f"sha256:{_sha(vocab_text)} ({len(tokenizer)} tokens)",
        "chat_template": f"sha256:{_sha(resolve_template(tokenizer, config.data.chat_template))}",
        "render": json.dumps(render_settings(config.data), sort_keys=True),
        "data": f"sha256:{_sha(records)} ({len(rendered)} records)",
    }


def fingerprint_key(fp: dict[str, str]) -> str:
    """The folder name a sweep gives the cache of this fingerprint."""
    return "fp-" + _sha(json.dumps(fp, sort_keys=True))


def describe_differences(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    """One line per part of a fingerprint that differs: the experiment's value, then the cache's."""
    lines = []
    for key in expected.keys() | found.keys():
        want, have = expected.get(key), found.get(key)
        if want == have:
            continue
        if key == "render" and want and have:
            a, b = json.loads(want), json.loads(have)
            for sub in sorted(a.keys() | b.keys()):
                if a.get(sub) != b.get(sub):
                    lines.append(f"data.{sub}: experiment {a.get(sub)!r}, cache {b.get(sub)!r}")
            continue
        lines.append(f"{key}: experiment {want}, cache {have}")
    return sorted(lines)


# ---------------------------------------------------------------------------------------------
# Reading


def rebuild_hint(directory: Path) -> str:
    """How to repair a damaged cache (the build checks every shard and redoes the bad ones)."""
    return f"rebuild it with essence teacher cache CONFIG --out {directory} (it redoes only the damage)"


def manifest_digest(manifest: dict) -> str:
    """The sha256 of a manifest without its own "sha256" entry."""
    rest = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def manifest_problem(manifest: dict) -> str | None:
    """Why a manifest cannot be trusted (it does not match its checksum), or None. A manifest
    without one (an older essence) is trusted."""
    digest = manifest.get("sha256")
    if digest is not None and digest != manifest_digest(manifest):
        return f"{MANIFEST} does not match its checksum"
    return None


def shard_problem(directory: Path, shard: dict) -> str | None:
    """What is wrong with one shard on disk (missing, truncated, a record's bytes changed)."""
    path = Path(directory) / shard["file"]
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size != shard["bytes"]:
        return f"{path} has {path.stat().st_size} bytes, {shard['bytes']} were written"
    with path.open("rb") as handle:
        for record in shard["records"]:
            handle.seek(record["offset"])
            if zlib.crc32(handle.read(record["bytes"])) != record["crc32"]:
                return f"{path}: record {record['id']!r} does not match its checksum"
    return None


def resolve_cache_dir(path: str | Path, fp: dict[str, str] | None = None) -> Path | None:
    """The cache folder: path itself when it holds a manifest, else path/<fingerprint key>
    (the layout essence sweep builds); None when neither is there."""
    path = Path(path).expanduser()
    if (path / MANIFEST).is_file():
        return path
    if fp is not None and (path / fingerprint_key(fp) / MANIFEST).is_file():
        return path / fingerprint_key(fp)
    return None


class CacheReader:
    """A built cache, opened read-only: its manifest and memory-mapped shards."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        try:
            self.manifest = json.loads((self.dir / MANIFEST).read_text())
            problem = manifest_problem(self.manifest)
            fmt = self.manifest.get("format")
            if fmt == FORMAT and problem is None:
                self.settings = CacheSettings(**self.manifest["settings"])
                self.vocab = int(self.manifest["vocab"])
                self.records = {r["id"]: r for s in self.manifest["shards"] for r in s["records"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise EssenceError(f"teacher cache {self.dir}: cannot read {MANIFEST} ({err}); "
                               f"{rebuild_hint(self.dir)}") from None
        if problem is not None:
            raise EssenceError(f"teacher cache {self.dir} is damaged: {problem}; "
                               f"{rebuild_hint(self.dir)}")
        if fmt != FORMAT:
            raise EssenceError(f"teacher cache {self.dir} has format {fmt}, "
                               f"this essence reads format {FORMAT}; rebuild it")
        self._maps: dict[str, np.memmap | None] = {}

    @property
    def fingerprint(self) -> dict[str, str]:
        return self.manifest["fingerprint"]

    def _shard(self, name: str) -> np.memmap | None:
        if name not in self._maps:
            path = self.dir / name
            expected = next(s["bytes"] for s in self.manifest["shards"] if s["file"] == name)
            if not path.is_file() or path.stat().st_size != expected:
                self._maps[name] = None
            else:
                self._maps[name] = np.memmap(path, dtype=np.uint8, mode="r") if expected else None
        return self._maps[name]

    def problem(self, record_id: str, digest: str) -> str | None:
        """Why the record cannot be served (not in the cache, other tokens), or None. A damaged
        shard (missing, truncated, a record's bytes changed) is refused: EssenceError."""
        entry = self.records.get(record_id)
        if entry is None:
            return f"record {record_id!r} is not in the teacher cache {self.dir}"
        if entry["tokens_sha1"] != digest:
            return (f"record {record_id!r}: its tokens differ from the teacher cache's "
                    "(the data or its rendering changed since the cache was built)")
        if entry["bytes"] == 0:
            return None
        shard = self._shard(entry["shard"])
        path = self.dir / entry["shard"]
        if shard is None:
            damage = f"shard {path} is missing or truncated"
        elif zlib.crc32(shard[entry["offset"]:entry["offset"] + entry["bytes"]]) != entry["crc32"]:
            damage = f"shard {path} is damaged (record {record_id!r} does not match its checksum)"
        else:
            return None
        raise EssenceError(f"teacher cache {self.dir}: {damage}; {rebuild_hint(self.dir)}")

    def read(self, record_id: str) -> RecordTargets:
        """The record's targets ([tokens − 1] rows). Call problem() first."""
        entry = self.records[record_id]
        rows = entry["tokens"] - 1
        if entry["bytes"] == 0:
            return decode(b"", 0, self.settings, self.vocab)
        shard = self._shard(entry["shard"])
        assert shard is not None, f"record {record_id} checked before reading"
        return decode(shard[entry["offset"]:entry["offset"] + entry["bytes"]], rows, self.settings,
                      self.vocab)
