"""Data. In: dataset rows (hub or local files) and the student's tokenizer. Out: Examples/Batches:
records → rendered token spans → truncation → supervision masks → length-grouped batches."""
