"""GainRLScheduler: ranks the training prompts, moves the sampler after each round, logs and plots it.

- fit start: points the module's angle-signal probe at the scoring layer and site (one setting for the
  ranking and the signal), and builds the ranking the schedule needs (angle scores of the current policy,
  sharded over DDP ranks and gathered; question lengths; a difficulty or pass-rate column), unless a
  checkpoint restored one;
- each trained batch: tells the sampler (DataLoaders prefetch, so only a callback knows what was trained)
  and collects the module's per-prompt report (accuracy, angle signal);
- after a round's last batch: `sampler.update(...)` with train (paper) or the latest validation accuracy;
  logs mu, the update's two terms, the mean score and rank of the drawn prompts; optionally re-scores
  every K rounds;
- fit end: writes `gainrl_schedule.png` (mu over rounds, drawn ranks) and `gainrl_schedule.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from gainrl_pl.schedules.rankings import angle_ranking, plot_schedule, ranking_from_values
from gainrl_pl.scoring import check_site

ACCURACY_SOURCES = ("train", "val")


class GainRLScheduler(pl.Callback):
    """Drives the data schedule of a GainRLDataModule from the GRPOModule's rollouts.

    Args:
        accuracy_source: `train`: the round's rollout accuracy (paper); `val`: the latest validation accuracy
            (from the previous validation run: rounds end with their last batch, before that round's validation).
        rescore_every_n_rounds: Re-score and re-rank the prompts with the current policy every K rounds (0 = never, as in the paper).
        layer: Decoder layer whose hidden states give the angle scores of the ranking and the rollouts' angle
            signal in the mean update (negative counts from the end; -1 = the last layer, as the paper).
        site: Where in that layer: `mlp_input` (the MLP's input, the paper's hidden states) or `layer_output`.
            Used by the ranking and the angle signal alike.
        intra_weight: Weight of C_intra in the score (paper: 1; reference script: 1).
        inter_weight: Weight of C_inter in the score (paper: 1; reference script: 8).
        intra_diagonal: Include i == j pairs in C_intra, as the paper defines it.
        score_batch_size: Prompts per scoring forward.
        use_cache: Reuse cached scores for the same (model, layer, prompts, weights).
        cache_dir: Score cache directory (`null` = $GAINRL_PL_CACHE or ~/.cache/gainrl_pl/scores).
        plot: Write the PNG of mu and drawn ranks at the end of training.
    """

    def __init__(self, accuracy_source: str = "train", rescore_every_n_rounds: int = 0, layer: int = -1,
                 site: str = "mlp_input", intra_weight: float = 1.0, inter_weight: float = 1.0,
                 intra_diagonal: bool = True, score_batch_size: int = 16, use_cache: bool = True,
                 cache_dir: str | None = None, plot: bool = True) -> None:
        if accuracy_source not in ACCURACY_SOURCES:
            raise ValueError(f"scheduler.accuracy_source={accuracy_source!r}: allowed values are {ACCURACY_SOURCES}")
        try:
            check_site(site)
        except ValueError as err:
            raise ValueError(f"scheduler.{err}") from None
        if rescore_every_n_rounds < 0:
            raise ValueError(f"scheduler.rescore_every_n_rounds={rescore_every_n_rounds} must be >= 0")
        self.accuracy_source = accuracy_source
        self.layer, self.site = layer, site
        self.rescore_every_n_rounds = rescore_every_n_rounds
        self.score_options = dict(layer=layer, site=site, w_intra=intra_weight, w_inter=inter_weight,
                                  intra_diagonal=intra_diagonal, batch_size=score_batch_size)
        self.use_cache = use_cache
        self.cache_dir = cache_dir
        self.plot = plot
        self.scores: list[float] | None = None
        self.ranking_summary: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self._round: dict[str, list[torch.Tensor]] = {}

    # ----------------------------------------------------------------- ranking
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe = getattr(pl_module, "angle_probe", None)
        if probe is not None:  # the rollouts' angle signal reads the hidden states the ranking reads
            try:
                probe.set_site(self.layer, self.site)
            except ValueError as err:
                raise ValueError(f"scheduler.{err}") from None
        dm = trainer.datamodule
        if dm.ranking is not None:  # restored from a checkpoint: keep the ranking the run was using
            return
        self._rank(trainer, pl_module)

    def _rank(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        name = dm.schedule.name
        if name == "angle":
            order, results, summary = angle_ranking(
                pl_module.policy, dm.tokenizer, dm.train_set, trainer.strategy, cache_dir=self.cache_dir,
                use_cache=self.use_cache, model_id=str(pl_module.hparams.model_name_or_path), **self.score_options)
            self.scores = [float(r.score) for r in results]
            self.ranking_summary = summary
            # Lightning forbids self.log in on_fit_start: write straight to the loggers (spec section 8 asks
            # for the score's mean/sd and Spearman with question length whenever a ranking is built).
            numeric = {f"gainrl/ranking/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}
            for logger in trainer.loggers:
                logger.log_metrics(numeric, step=trainer.global_step)
            if trainer.is_global_zero:
                print(f"[gainrl] ranked {len(order)} prompts by angle concentration: {summary}")
        elif name == "length":  # shortest question first, ties by position (spec section 8)
            order = ranking_from_values([item["question_tokens"] for item in dm.train_set])
        elif name == "accuracy_curriculum":  # easiest first: a difficulty ascending, a pass rate descending
            if dm.schedule.pass_rate_field:
                order = ranking_from_values(dm.column_values(dm.schedule.pass_rate_field), descending=True)
            else:
                order = ranking_from_values(dm.column_values(dm.schedule.difficulty_field))
        else:
            return  # uniform / adarft / pass-rate priority need no ranking
        dm.set_ranking(order)

    # ----------------------------------------------------------------- each batch and round
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sampler = trainer.datamodule.sampler
        sampler.mark_batch_consumed()
        report = getattr(pl_module, "last_rollout_report", None)
        if report:
            for key, value in report.items():
                self._round.setdefault(key, []).append(value.detach().cpu())
            pl_module.last_rollout_report = None
        # The round ends with its last batch, not with Lightning's epoch hooks: those are skipped when a
        # run resumes from a checkpoint taken after the last batch, and this hook runs before
        # ModelCheckpoint's, so every checkpoint holds either a whole round's update or none of it.
        if sampler.consumed_batches >= len(sampler):
            self._finish_round(trainer, pl_module)

    def _finish_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if not self._round:
            return
        sampler = dm.sampler
        indices = torch.cat(self._round["index"]).long()
        accuracy = torch.cat(self._round["accuracy"]).float()
        signal = torch.cat(self._round["signal"]).float()
        self._round = {}
        if self.accuracy_source == "val":
            val = trainer.callback_metrics.get("val/accuracy")
            if val is not None:  # until the first validation, fall back to the rollouts' accuracy
                accuracy = torch.full_like(accuracy, float(val))
        metrics = sampler.update(indices.tolist(), accuracy.tolist(), signal.tolist()) or {}
        entry = {"round": len(self.history), "step": trainer.global_step, "accuracy": float(accuracy.mean()),
                 "angle_signal": float(signal.mean()), **{k: float(v) for k, v in metrics.items()}}
        if dm.ranking is not None:
            position = {int(d): r for r, d in enumerate(dm.ranking)}
            ranks = [position[int(i)] for i in indices]
            entry["drawn_rank_mean"] = sum(ranks) / len(ranks)
            entry["drawn_ranks"] = ranks
        if self.scores is not None:
            entry["drawn_score_mean"] = float(sum(self.scores[int(i)] for i in indices) / len(indices))
        self.history.append(entry)
        # Straight to the loggers, one row per round at this batch's logging step: a `self.log(on_step=True)`
        # value is dropped at batches `log_every_n_steps` skips, and an epoch-level one waits for an epoch end
        # that a run stopped in the validation after this batch never reaches (its resume does not redo the
        # batch). `round_` marks the round means apart from the per-batch values of the same signals.
        names = {"accuracy": "round_accuracy", "angle_signal": "round_angle_signal"}
        row = {f"gainrl/{names.get(key, key)}": value for key, value in entry.items()
               if isinstance(value, float) and key not in ("round", "step")}
        row["epoch"] = float(trainer.current_epoch)
        for logger in trainer.loggers:
            logger.log_metrics(row, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
        if "mu" in entry:
            pl_module.log("gainrl/mu", entry["mu"], on_step=True, on_epoch=False, prog_bar=True, logger=False,
                          batch_size=1)
        k = self.rescore_every_n_rounds
        if k and len(self.history) % k == 0 and dm.schedule.name == "angle":
            self._rank(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # trainer.log_dir is a collective under DDP (a broadcast): every rank must ask, before rank 0 writes
        log_dir = trainer.log_dir
        if trainer.global_rank != 0 or not self.history:
            return
        out = Path(log_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gainrl_schedule.json").write_text(json.dumps(self.history, indent=1))
        if self.plot:
            path = plot_schedule(self.history, out / "gainrl_schedule.png",
                                 num_prompts=len(trainer.datamodule.train_set))
            print(f"[gainrl] schedule plot: {path}")
        print(f"[gainrl] logs (metrics.csv, completions.jsonl): {out}")

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        # The reports of the round in progress travel too: a checkpoint taken after a round's last batch
        # (before its end-of-round update) must still apply that update exactly once after a resume.
        in_progress = {k: torch.cat(v).tolist() for k, v in self._round.items()}
        return {"history": self.history, "scores": self.scores, "round_reports": in_progress,
                "ranking_summary": self.ranking_summary}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.scores = state_dict.get("scores")
        self.ranking_summary = dict(state_dict.get("ranking_summary") or {})
        self._round = {k: [torch.tensor(v)] for k, v in (state_dict.get("round_reports") or {}).items() if v}
