"""Sample completions, written as a table every N steps: JSONL next to the logs, and text for TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path


class CompletionLogger:
    """Appends prompt / completion / reward rows to `<log_dir>/completions.jsonl` (rank 0 only)."""

    def write(self, module, prompts: list[str], completions: list[str], rewards, group: int, limit: int) -> None:
        rows = []
        for i, completion in enumerate(completions[:limit]):
            row = {"step": module.trainer.global_step, "prompt": prompts[i // group], "completion": completion,
                   "reward": float(rewards.total[i])}
            for j, name in enumerate(module.reward_names):
                row[name] = float(rewards.per_function[i, j])
            rows.append(row)
        log_dir = _log_dir(module)
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "completions.jsonl", "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        experiment = getattr(module.logger, "experiment", None)
        if hasattr(experiment, "add_text"):  # TensorBoard: a Markdown table per step
            lines = ["| reward | completion |", "| --- | --- |"]
            lines += [f"| {r['reward']:.2f} | {r['completion'][:300]!r} |" for r in rows]
            experiment.add_text("completions", "\n".join(lines), module.trainer.global_step)


def _log_dir(module) -> Path:
    logger = module.logger
    if logger is not None and getattr(logger, "log_dir", None):
        return Path(logger.log_dir)
    return Path(module.trainer.default_root_dir)
