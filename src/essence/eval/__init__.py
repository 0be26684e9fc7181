"""Evaluation: benchmarks → prompts → generations → math-verify grading → summary.json + details.jsonl.

Kept free of imports on purpose: the grading worker process imports `essence.eval.verifier`,
and it should not pay for torch or transformers just to compare two answers.
"""
