"""Shared offline fixtures: the Qwen3 tokenizer copy, a small tokenizer built here, data files."""

from __future__ import annotations

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
