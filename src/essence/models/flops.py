"""Compute accounting: FLOPs per sequence, peak memory, and the run's cost summary.

FLOPs formula (model FLOPs: 2 FLOPs per multiply-accumulate, as in Kaplan et al.; the
attention term is PaLM's convention, Chowdhery et al. 2022, appendix B):

    forward(T, R) = 2 · P_body · T  +  2 · V · d · R  +  4 · L · d_attn · T²
    training      = 3 · forward      (the backward pass costs about twice the forward)

for one sequence of T tokens of which R rows go through the LM head, where P_body counts every
weight matrix of the transformer body (all parameters except the input embedding and the LM
head), V · d is the LM head as the loss uses it (the compared vocabulary V, hidden size d), L is
the number of layers and d_attn = heads × head_dim. The attention term counts the score and
value products over the whole T × T square, as dense kernels do.

Frozen weights (LoRA: the base model and the LM head) get no weight gradient, so the backward
pass skips that half of their cost:

    training      = 3 · forward  −  2 · P_frozen · T  −  2 · V · d · R · [head frozen]

where P_body (in forward) includes the adapters' A and B matrices, P_frozen counts the body
parameters that do not train, and the head term drops when the head is frozen. With rank-r
adapters P_frozen ≈ P_body, so a LoRA step costs about 2/3 of a full fine-tuning step, not 3·forward
(e.g. Qwen3-4B-Base, r = 16 on q_proj and v_proj: about 0.67×).

Packed sequences (data.packing) count attention per sequence, Σ 4 · L · d_attn · T_i², what a
variable-length kernel runs; the exact CPU path (a block-diagonal mask over the packed row)
computes the whole square and masks it, which costs more than is counted.

Accounting equals execution: the fused loss projects only the supervised rows through the
student's head (R = NLL ∪ KD targets), the teacher's head sees only the KD rows, and a teacher
that is not run (loss.kd_ratio = 0) is charged nothing. Recomputation by gradient
checkpointing is not counted: these are model FLOPs, not hardware FLOPs. Every processed
token counts in the body, supervised or not; padding does not.

Sampled training text (essence.train.sampling) has its own lines: generation is forward-only work
with a KV cache (``FlopModel.generate``), and the teacher's forward over sampled tokens is its
scoring (``Ledger.teacher_scoring_flops``), apart from its forward over the dataset's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlopModel:
    """The numbers the FLOPs formula needs from one model."""

    params: int
    """P_body: body parameters a token's forward pass multiplies by (see module docstring)."""
    head: int
    """V · d: the LM-head weights one projected row multiplies by."""
    layers: int
    attn_dim: int
    frozen: int = 0
    """P_frozen: body parameters without a weight gradient (LoRA's base); 0 in full training."""
    head_frozen: bool = False
    """The LM head gets no weight gradient (LoRA)."""

    def forward(self, lengths: list[int] | torch.Tensor,
                head_rows: list[int] | torch.Tensor | None = None) -> float:
        """Forward FLOPs of sequences with these lengths (padding excluded), of which head_rows
        rows per sequence go through the LM head (None: every token, as generation does)."""
        lengths = [int(n) for n in lengths]
        rows = lengths if head_rows is None else [int(r) for r in head_rows]
        assert len(rows) == len(lengths), "one head-row count per sequence"
        return float(sum(2 * self.params * n + 2 * self.head * r + 4 * self.layers * self.attn_dim * n * n
                         for n, r in zip(lengths, rows)))

    def train(self, lengths: list[int] | torch.Tensor,
              head_rows: list[int] | torch.Tensor | None = None) -> float:
        """Forward + backward FLOPs; frozen weights skip their weight gradient (docstring)."""
        tokens = sum(int(n) for n in lengths)
        rows = tokens if head_rows is None else sum(int(r) for r in head_rows)
        skipped = 2 * self.frozen * tokens + (2 * self.head * rows if self.head_frozen else 0)
        return 3.0 * self.forward(lengths, head_rows) - float(skipped)

    def generate(self, prompts: list[int], new: list[int]) -> float:
        """Forward FLOPs of generating new[i] tokens after a prompt of prompts[i] tokens with a
        KV cache: the prompt's prefill (the head on its last row only), then one row per further
        token, whose attention reads the n cached keys and values of its context (4·L·d_attn·n,
        the square's convention row by row). Padding costs nothing, as everywhere here."""
        total = 0.0
        for p, g in zip(prompts, new):
            if g <= 0:
                continue
            total += self.forward([p], [1])
            steps = g - 1  # the last token is sampled, never fed back
            contexts = steps * p + steps * (steps + 1) // 2  # Σ (p + k), k = 1..steps
            total += steps * (2 * self.params + 2 * self.head) + 4 * self.layers * self.attn_dim * contexts
        return float(total)

    @property
    def total_params(self) -> int:
        """P_body + the LM head as used: what a full-vocabulary forward multiplies by."""
        return self.params + self.head


def flop_model(model: torch.nn.Module, vocab: int | None = None) -> FlopModel:
    """Read P_body, V·d, L and d_attn off a transformers causal LM; vocab = the compared
    vocabulary (the loss uses the head's first `vocab` rows; None: all of them)."""
    config = model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = [p for p in model.parameters() if p is not embed and p is not head]
    params = sum(p.numel() for p in body)
    frozen = sum(p.numel() for p in body if not p.requires_grad)
    width = head.shape[0] if vocab is None else min(vocab, head.shape[0])
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return FlopModel(params=params, head=width * head.shape[1], layers=config.num_hidden_layers,
                     attn_dim=heads * head_dim, frozen=frozen, head_frozen=not head.requires_grad)
