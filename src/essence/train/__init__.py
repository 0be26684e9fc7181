"""Training. In: a Config. Out: a run folder (checkpoints, final model, metrics.jsonl, summary.json
with the compute accounting); setup builds everything, the loop drives step, checkpoints, tracking."""
