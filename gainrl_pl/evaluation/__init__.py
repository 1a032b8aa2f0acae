"""Evaluation: `gainrl-pl evaluate` and `gainrl-pl export`, and the statistics both report.

- `evaluate`: benchmark a base model, a LoRA adapter or a training checkpoint, as the paper does.
- `backends`: which model (base, adapter, checkpoint) and how it generates; `sets`: the benchmarks as presets.
- `results`: per-sample JSONL files (resumable), run config, summaries; `metrics`: pass@k, Wilson interval.
- `export`: merge a LoRA adapter into its base model; `study_stats`: paired comparisons of schedules.
"""
