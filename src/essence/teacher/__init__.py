"""The teacher. In: rendered, truncated batches. Out: the teacher's outputs for the kept tokens,
from an online forward pass or read from a top-k cache that one full-sequence pass built."""
