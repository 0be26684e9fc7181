"""The loss. In: student hidden states, the LM head, teacher logits or top-k targets, the masks.
Out: (1-λ)·NLL + λ·KD sums with fp32 gradients (divergences, the fused chunked loss, sparse KD)."""
