"""Sampled training text: on-policy, sequence-level and lead-then-student continuations.

A sampled optimizer step replaces each of its micro-batches by batches built around generated
text, with masks marking exactly the tokens to supervise, so the loop, the loss and its one
normalisation place stay as they are:

- ``on_policy`` (the student writes) and ``sequence_level`` (the teacher writes), as the
  paper's reference code: generate from each record's whole prompt (truncation applies to the
  dataset's traces, never to sampled text) and put the KD term on the generated tokens (and on
  the prompt with ``include_prompt_loss``). The NLL term stays on the dataset's trace
  (``nll_on: data``, the reference's choice: its NLL is the original batch's loss), or moves to
  the teacher's text (``nll_on: sample``, sequence-level KD in Kim & Rush's sense).
- ``lead_then_student``: the lead span stays teacher-forced exactly as without sampling; the
  student continues from the cut and the teacher's KD on that continuation is a third term with
  its own divergence, weight and token count (``Batch.continuation_mask``). A sequence kept
  whole (nothing was cut) gets no continuation.

Whether a step is sampled is one seeded draw per optimizer step, the same on every process.
Generation is seeded from (seed, step, process, micro-batch) inside a forked RNG, so training's
own random state is untouched and a resumed run samples exactly what an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from essence.config.schema import SamplingConfig
from essence.data.batching import SEGMENT_SAMPLED, Batch, Example, collate


def is_sampled_step(config: SamplingConfig, step: int) -> bool:
    """Whether optimizer step `step` (0-based, global) trains on sampled text: a function of the
    seed and the step alone, so every process and every resume agrees without communicating."""
    if not config.active:
        return False
    return random.Random(config.seed * 1_000_003 + step).random() < config.fraction


# ---------------------------------------------------------------------------------------------
# Generation behind a small interface (a vLLM engine can implement the same call later)


class Generator(Protocol):
    def __call__(self, model: torch.nn.Module, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """The tokens generated after each prompt (ids; the stop token kept when one was hit)."""


class HFGenerator:
    """transformers `generate`: left-padded prompts, KV cache on, stop at the end of the turn.

    The model generates in eval mode (no dropout; transformers then skips gradient
    checkpointing, which would otherwise turn the KV cache off) and goes back to its former mode.
    synced_gpus keeps FSDP processes stepping together until every one has finished.
    """

    def __init__(self, config: SamplingConfig, stop_ids: list[int], pad_id: int,
                 synced_gpus: bool = False):
        self.config, self.stop_ids, self.pad_id = config, stop_ids, pad_id
        self.synced_gpus = synced_gpus

    def kwargs(self) -> dict:
        c = self.config
        common = {"max_new_tokens": c.max_new_tokens, "use_cache": True, "top_k": c.top_k,
                  "repetition_penalty": 1.0, "eos_token_id": self.stop_ids,
                  "pad_token_id": self.pad_id, "synced_gpus": self.synced_gpus}
        if c.temperature == 0:
            return {**common, "do_sample": False, "temperature": 1.0, "top_p": 1.0}
        return {**common, "do_sample": True, "temperature": c.temperature, "top_p": c.top_p}

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, prompts: list[list[int]], seed: int) -> list[list[int]]:
        from essence.eval.generate import _left_pad

        device = next(model.parameters()).device
        ids, mask = _left_pad(prompts, self.pad_id, device)
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = model.generate(input_ids=ids, attention_mask=mask, **self.kwargs())
        finally:
            model.train(was_training)
        return [cut_at_stop(row, self.stop_ids) for row in out[:, ids.shape[1]:].tolist()]


def cut_at_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """The generated tokens up to and including the first stop token (the student learns to stop)."""
    stops = set(stop_ids)
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i + 1]
    return tokens


# ---------------------------------------------------------------------------------------------
# Sampled batches


@dataclass
class GenerationCost:
    """What one step's generation cost on this process."""

    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    sequences: int = 0


def build_sampler(config, models, rendered: list, accelerator) -> "Sampler":
    """The sampler of config.sampling.method, with each record's whole prompt and full length
    (models: essence.train.setup.Models; rendered: the data's rendered records)."""
    from essence.eval.generate import stop_token_ids

    tokenizer = models.tokenizer
    stops = stop_token_ids(tokenizer, getattr(models.student, "generation_config", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    fsdp = accelerator.distributed_type.name == "FSDP"
    generator = HFGenerator(config.sampling, stops, pad, synced_gpus=fsdp)
    prompts = {r.record_id: r.input_ids[:r.spans.prompt[1]] for r in rendered}
    lengths = {r.record_id: len(r.input_ids) for r in rendered}
    return Sampler(config.sampling, config.loss.kd_ratio, prompts, lengths, pad, generator)


class Sampler:
    """Builds a sampled step's micro-batches from its teacher-forced ones (this process's)."""

    def __init__(self, config: SamplingConfig, kd_ratio: float, prompts: dict[str, list[int]],
                 full_lengths: dict[str, int], pad_id: int, generator: Generator):
        """prompts: each record's whole rendered prompt (ids); full_lengths: its untruncated
        length (a kept sequence that long was not cut and gets no continuation)."""
        self.config, self.kd_ratio = config, kd_ratio
        self.prompts, self.full_lengths = prompts, full_lengths
        self.pad_id, self.generate = pad_id, generator

    def seed(self, step: int, index: int) -> int:
        """Generation seed of the step's micro-batch `index` (its place in the step's global
        plan), so N processes × accumulation 1 sample what 1 process × accumulation N does."""
        return (self.config.seed * 1_000_003 + step) * 1_000_033 + index

    def sample(self, batches: list[Batch], step: int, process: int, world: int, student, teacher,
               student_flops, teacher_flops) -> tuple[list[Batch], GenerationCost]:
        """Every generation of the step happens here, before its first backward pass (the step's
        token counts are summed over all of its batches first). batches: this process's
        micro-batches (process p holds the plan's micro-batches p, p + world, ...);
        student/teacher: the models that may write; *_flops: their FlopModels (generation
        FLOPs are charged to the writer)."""
        cost = GenerationCost()
        out: list[Batch] = []
        writer, flops = (teacher, teacher_flops) if self.config.method == "sequence_level" \
            else (student, student_flops)
        for micro, batch in enumerate(batches):
            if self.config.method == "lead_then_student":
                contexts = [row_ids(batch, r) for r in range(len(batch.record_ids))]
            else:
                contexts = [self.prompts[rid] for rid in batch.record_ids]
            started = time.perf_counter()
            new = self.generate(writer, contexts, self.seed(step, micro * world + process))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            cost.seconds += time.perf_counter() - started
            cost.tokens += sum(len(n) for n in new)
            cost.sequences += len(new)
            cost.flops += flops.generate([len(c) for c in contexts], [len(n) for n in new])
            if self.config.method == "lead_then_student":
                out.append(self.continued(batch, new))
            else:
                out += self.responses(batch, contexts, new)
        return out, cost

    def responses(self, batch: Batch, prompts: list[list[int]], new: list[list[int]]) -> list[Batch]:
        """on_policy / sequence_level: the sampled batch (KD on the generated tokens, prompt
        optional; NLL there too with nll_on: sample), and with nll_on: data the dataset's batch
        carrying the NLL term alone (left out when the NLL weight is 0)."""
        c = self.config
        examples = []
        for rid, prompt, gen in zip(batch.record_ids, prompts, new):
            kd = [c.include_prompt_loss and i > 0 for i in range(len(prompt))] + [True] * len(gen)
            nll = kd if c.nll_on == "sample" else [False] * len(kd)
            examples.append(Example(rid, prompt + gen, [1] * len(prompt) + [SEGMENT_SAMPLED] * len(gen),
                                    nll, kd))
        sampled = collate(examples, self.pad_id)
        if c.nll_on == "sample" or self.kd_ratio == 1.0:
            return [sampled]
        return [dataclasses.replace(batch, kd_mask=torch.zeros_like(batch.kd_mask)), sampled]

    def continued(self, batch: Batch, new: list[list[int]]) -> Batch:
        """lead_then_student: each kept lead with the student's continuation appended; the lead's
        masks as they were, the continuation in continuation_mask only (no NLL: no reference)."""
        examples, continuation = [], []
        for r, (rid, gen) in enumerate(zip(batch.record_ids, new)):
            n = int(batch.attention_mask[r].sum())
            if n >= self.full_lengths[rid]:  # kept whole: there is no cut to continue from
                gen = []
            lead = slice(0, n)
            examples.append(Example(
                rid, row_ids(batch, r) + gen,
                batch.segment_ids[r, lead].tolist() + [SEGMENT_SAMPLED] * len(gen),
                batch.nll_mask[r, lead].tolist() + [False] * len(gen),
                batch.kd_mask[r, lead].tolist() + [False] * len(gen)))
            continuation.append([False] * n + [True] * len(gen))
        out = collate(examples, self.pad_id)
        mask = torch.zeros_like(out.nll_mask)
        for r, row in enumerate(continuation):
            mask[r, :len(row)] = torch.tensor(row, dtype=torch.bool)
        out.continuation_mask = mask
        return out


def row_ids(batch: Batch, row: int) -> list[int]:
    """The real (unpadded) token ids of one row of a right-padded batch."""
    return batch.input_ids[row, :int(batch.attention_mask[row].sum())].tolist()


@contextlib.contextmanager
def generation_context(wrapped: torch.nn.Module, fsdp: bool):
    """Under FSDP (torch's FullyShardedDataParallel) the root's own parameters are sharded
    outside its forward: gather them while generating; nested units gather as they run.
    Untested here (no GPU machine); the common workaround for transformers' generate."""
    if not fsdp:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(wrapped, FSDP):
        with FSDP.summon_full_params(wrapped, recurse=False, writeback=False):
            yield
    else:
        yield
