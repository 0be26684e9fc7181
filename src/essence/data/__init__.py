"""Data core: records → rendered token spans → truncation → supervision masks → batches."""
