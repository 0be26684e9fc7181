"""Experiments. In: configs, grids and finished run folders. Out: many runs and what they show:
sweeps, the trade-off report, the demo, the real-model study, the trace analysis."""
