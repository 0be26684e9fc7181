"""essence: efficient reasoning distillation by segment supervision and lead-span truncation."""

__version__ = "0.1.0"
