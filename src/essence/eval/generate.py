"""Sampling n responses per prompt: Hugging Face `generate` (CPU or GPU) or vLLM (GPU, optional).

Both backends take the same rendered prompts, stop at the same tokens and decode the same way
(cut at the first stop token, special tokens kept so `</think>` survives in any tokenizer),
so a benchmark gives comparable numbers on either. Sampling is plain temperature + top-p
(top-k off), the paper's setting; temperature 0 means greedy.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

from essence.errors import EssenceError
from essence.faults import fault_point

Backend = Literal["hf", "vllm"]

# End-of-turn markers of common chat formats: a chat model ends its answer with one of these,
# which is often not the tokenizer's eos (a Qwen base tokenizer's eos is <|endoftext|>).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
)


@dataclass(frozen=True)
class Sample:
    """One generated response."""

    text: str  # the generated text up to (not including) the stop token
    num_tokens: int  # generated tokens, the stop token included
    truncated: bool  # hit max_new_tokens before a stop token
    ids: tuple[int, ...] = field(default=(), repr=False, compare=False)  # text's token ids


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled; the same settings and seed give the same responses."""

    n: int = 1  # responses per prompt
    max_new_tokens: int = 4096
    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.95
    seed: int = 0

    def check(self) -> None:
        """Raise a clear error for a setting no backend accepts."""
        if self.n < 1:
            raise EssenceError(f"n must be at least 1 (responses per problem), got {self.n}")
        if self.max_new_tokens < 1:
            raise EssenceError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise EssenceError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EssenceError(f"top_p must be in (0, 1], got {self.top_p}")


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end a response: eos (tokenizer's and model's) and known end-of-turn tokens."""
    ids: list[int] = []
    candidates = [tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)]
    vocab = tokenizer.get_vocab()
    candidates += [vocab.get(token) for token in END_OF_TURN_TOKENS]
    for candidate in candidates:
        for token_id in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    if not ids:
        raise EssenceError(
            "the tokenizer has no eos token and no known end-of-turn token; set its eos_token"
        )
    return ids


def to_sample(token_ids: list[int], stop_ids: list[int], tokenizer) -> Sample:
    """A Sample from the generated ids: cut at the first stop token, or truncated if none."""
    stops = set(stop_ids)
    end = next((i for i, token in enumerate(token_ids) if token in stops), None)
    if end is None:
        return Sample(tokenizer.decode(token_ids, skip_special_tokens=False), len(token_ids), True,
                      tuple(token_ids))
    return Sample(tokenizer.decode(token_ids[:end], skip_special_tokens=False), end + 1, False,
                  tuple(token_ids[:end]))


def generate_hf(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    settings: SamplingSettings,
    *,
    batch_size: int = 8,
    progress: bool = True,
    done: dict[tuple[int, int], Sample] | None = None,
    on_batch: Callable[[list[tuple[int, int]], list[Sample]], None] | None = None,
    before_batch: Callable[[], None] | None = None,
) -> list[list[Sample]]:
    """settings.n samples for each prompt with `model.generate`; [prompts][n] Samples.

    batch_size counts sequences (a prompt's n samples may span batches). Batches are seeded
    from settings.seed and their position, so the same seed, batch size and device reproduce
    the same responses; the caller's random state is left untouched. A resumed evaluation
    passes the responses it has (`done`, by (prompt, sample)): batches made only of those are
    not generated again; `on_batch` gets each generated batch; `before_batch` runs before each
    (it raises to stop).
    """
    settings.check()
    if batch_size < 1:
        raise EssenceError(f"batch_size must be at least 1, got {batch_size}")
    stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    encoded = [_ids(tokenizer, prompt) for prompt in prompts]
    # Greedy samples are identical: generate one and repeat it.
    n = 1 if settings.temperature == 0 else settings.n
    # Longest prompts first: less padding per batch, and an out-of-memory shows up at once.
    jobs = sorted(
        ((i, s) for i in range(len(prompts)) for s in range(n)), key=lambda j: -len(encoded[j[0]])
    )
    results: list[list[Sample | None]] = [[None] * n for _ in prompts]
    with _progress(len(prompts), progress) as advance:
        for batch_index, start in enumerate(range(0, len(jobs), batch_size)):
            batch = jobs[start : start + batch_size]
            if done and all(job in done for job in batch):
                for i, s in batch:
                    results[i][s] = done[i, s]
                advance(len(batch) / n)
                continue
            if before_batch is not None:
                before_batch()
            fault_point(f"generate-batch-{batch_index}")
            rows = _generate_batch(model, [encoded[i] for i, _ in batch], settings, batch_index,
                                   pad_id, stop_ids)
            for (i, s), row in zip(batch, rows):
                results[i][s] = to_sample(row, stop_ids, tokenizer)
            if on_batch is not None:
                on_batch(batch, [results[i][s] for i, s in batch])
            advance(len(batch) / n)
    return [row * (settings.n // n) for row in results]  # type: ignore[misc]  (all filled)


def _generate_batch(model, prompts: list[list[int]], settings: SamplingSettings, index: int,
                    pad_id: int, stop_ids: list[int]) -> list[list[int]]:
    """The new token ids of one left-padded batch, seeded by the batch's position."""
    import torch

    device = model.device
    input_ids, attention_mask = _left_pad(prompts, pad_id, device)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
        torch.manual_seed(settings.seed * 1_000_003 + index)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                pad_token_id=pad_id, eos_token_id=stop_ids,
                                **_hf_sampling_kwargs(settings))
    return output[:, input_ids.shape[1]:].tolist()


def load_vllm(model_path: str, *, tokenizer_path: str | None = None, seed: int = 0):
    """A vLLM engine for `model_path`, loaded once and reused for every benchmark."""
    require_vllm()
    from vllm import LLM

    return LLM(model=model_path, tokenizer=tokenizer_path or model_path, seed=seed)


def generate_vllm(
    llm, tokenizer, prompts: list[str] | list[list[int]], settings: SamplingSettings, *,
    progress: bool = True
) -> list[list[Sample]]:
    """settings.n samples for each prompt with a vLLM engine (see load_vllm); [prompts][n] Samples.

    Each prompt gets its own seed, so results do not depend on how vLLM batches them.
    """
    from vllm import SamplingParams

    settings.check()
    stop_ids = stop_token_ids(tokenizer)
    # Greedy samples are identical; older vLLM refuses n > 1 without sampling.
    n = 1 if settings.temperature == 0 else settings.n
    params = [
        SamplingParams(
            n=n,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_new_tokens,
            seed=settings.seed * 1_000_003 + i,
            stop_token_ids=stop_ids,
            skip_special_tokens=False,
        )
        for i in range(len(prompts))
    ]
    # Token ids, not text: vLLM would add a BOS the rendered template may already contain.
    inputs = [{"prompt_token_ids": _ids(tokenizer, p)} for p in prompts]
    outputs = llm.generate(inputs, params, use_tqdm=progress)
    results = []
    for out in outputs:
        samples = [to_sample(list(o.token_ids), stop_ids, tokenizer) for o in out.outputs]
        results.append((samples * settings.n)[: settings.n])
    return results


def _ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """A prompt's token ids: a rendered text is tokenized, ids (a budget's phase 2) pass as is."""
    if isinstance(prompt, list):
        return prompt
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def require_vllm() -> None:
    """Raise a clear error when the vLLM backend is asked for but vLLM is not installed."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise EssenceError(
            "backend 'vllm' needs vLLM, which is not installed: pip install 'essence[vllm]' "
            "(GPU only), or use --backend hf"
        )


def _hf_sampling_kwargs(settings: SamplingSettings) -> dict:
    common = {"max_new_tokens": settings.max_new_tokens, "top_k": 0, "repetition_penalty": 1.0}
    if settings.temperature == 0:
        return {**common, "do_sample": False, "temperature": 1.0, "top_p": 1.0}
    return {
        **common,
        "do_sample": True,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
    }


def _left_pad(rows: list[list[int]], pad_id: int, device):
    """input_ids, attention_mask: [batch, longest] with padding on the left, so every row
    ends where generation begins."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[k, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[float], None]]:
    """A rich progress bar over problems, on stderr (stdout is left for the results table)."""
    if not enabled:
        yield lambda _: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("problems", total=total)
        yield lambda problems: bar.advance(task, problems)
