"""GainRLDataModule: rows -> prompts (chat template, segments) -> ranked dataset -> round sampler.

A sampling round (the paper's "epoch") is one Lightning epoch: the sampler draws `subset_size` prompts
when the train loader is iterated; each DDP rank takes its own shard; the scheduler callback updates the
sampler after the round. The sampler's state (mu, round, RNG, position in the round) and the ranking go
into Lightning checkpoints through `state_dict` / `load_state_dict`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from gainrl_pl.data import DATASET_PRESETS, DataError, build_examples, load_rows, resolve_data_path
from gainrl_pl.data.prompts import PromptTooLongError, build_chat_prompt, build_prompt, get_prompt_template
from gainrl_pl.schedules import SAMPLER_NAMES, build_sampler, check_sigma


@dataclass
class ScheduleSettings:
    """Which data schedule draws each round, and its knobs (spec sections 4, 5, 8, 9).

    Args:
        name: `angle` (GAIN-RL), `length` (shortest question first, same Gaussian schedule),
            `accuracy_curriculum` (easiest first by `difficulty_field` or `pass_rate_field`), `uniform` (vanilla
            GRPO), `adarft`, `pass_rate_priority`, `greso` (skip prompts whose recent groups had zero reward
            variance), `mopps` (Beta posteriors, Thompson sampling toward pass rate 0.5; set `extra:
            {rollouts_per_prompt: <model.num_generations>}`).
        subset_size: Prompts per sampling round (the paper's epoch), summed over DDP ranks.
        sigma: Gaussian width over rank positions: ranks if > 1, a fraction of the dataset size if <= 1.
        initial_mu: mu_0, the Gaussian's starting mean (rank; 0 = top of the ranking); a fraction of N if in (0,
            1).
        step_size: n: scale of the per-round mean shift (ranks if > 1, fraction of N if <= 1).
        sensitivity: alpha: tanh sensitivity of both update terms.
        target_accuracy: beta (paper): the accuracy at which the accuracy term is zero.
        min_shift: adj_min: lower clamp of the per-round shift (0 = the mean never moves back).
        max_shift: adj_max: upper clamp of the per-round shift (ranks if > 1, fraction of N if <= 1).
        reference_lag: Draw each round with the previous round's mu, as the reference TRL script does.
        difficulty_field: Dataset column with a difficulty, higher = harder (e.g. MATH's `level`):
            `accuracy_curriculum` ranks it ascending (easiest first); `adarft` targets it.
        pass_rate_field: Dataset column with a measured pass rate, higher = easier: `accuracy_curriculum` ranks
            it descending (easiest first). Set this or `difficulty_field`, not both.
        seed: Seed of the round draws (identical on every DDP rank).
        extra: Further keyword arguments for the chosen sampler (e.g. AdaRFT's `target_reward`).
    """

    name: str = "angle"
    subset_size: int = 256
    sigma: float = 1000.0
    initial_mu: float = 0.0
    step_size: float = 500.0
    sensitivity: float = 2.0
    target_accuracy: float = 0.5
    min_shift: float = 0.0
    max_shift: float = 1000.0
    reference_lag: bool = False
    difficulty_field: str | None = None
    pass_rate_field: str | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in SAMPLER_NAMES:
            raise ValueError(f"schedule.name={self.name!r} is not a known schedule; allowed: {', '.join(SAMPLER_NAMES)}")
        if self.subset_size < 1:
            raise ValueError(f"schedule.subset_size={self.subset_size} must be >= 1")
        check_sigma(self.sigma, "schedule.sigma")
        if self.name == "accuracy_curriculum" and bool(self.difficulty_field) == bool(self.pass_rate_field):
            raise ValueError("schedule.name='accuracy_curriculum' ranks easiest first by one column: set either "
                             "schedule.difficulty_field (higher = harder, ranked ascending) or "
                             "schedule.pass_rate_field (higher = easier, ranked descending)")
        if self.pass_rate_field and self.name != "accuracy_curriculum":
            raise ValueError(f"schedule.pass_rate_field is used by the accuracy_curriculum schedule only, not by "
                             f"{self.name!r}; remove it")


class GainRLDataModule(pl.LightningDataModule):
    """Training/validation prompts for GRPO, drawn by a GAIN-RL (or baseline) schedule.

    Args:
        train_data: Training rows: a JSON/JSONL/Parquet/CSV file, a saved `datasets` directory, or a Hugging Face
            hub dataset `owner/name[:config[:split]]` (e.g. `openai/gsm8k:main:train`; needs internet once).
        val_data: Validation rows (same formats); `null` = no validation.
        test_data: Test rows for `gainrl-pl test`; `null` = use `val_data`.
        preset: Dataset preset that names the fields and parses answers (`gsm8k`, `math`, `arithmetic`, `trl` =
            TRL's `prompt` + `solution` columns, ...).
        question_field: Override the preset's question column. It may hold text, or chat messages (TRL's
            conversational format: a list of `{"role", "content"}` ending with the user's question), which are
            rendered as they are: the last user turn is the question for the angle score, earlier turns the prefix.
        answer_field: Override the preset's answer column.
        prompt: Prompt preset (`paper`: R1-style system prompt + one worked example; `plain`; `none`) for
            questions given as text; chat-message rows keep their own messages.
        system_prompt: Override the preset's system prompt (`null` keeps it).
        chat_template_kwargs: Extra variables for the tokenizer's chat template, as TRL's option of that name
            (e.g. `{enable_thinking: false}` for Qwen3); they shape the prompts trained on, validated on and scored.
        tokenizer: Tokenizer to build prompts with (linked to `model.model_name_or_path` by the CLI).
        trust_remote_code: Allow custom tokenizer code (linked to the model's setting).
        max_prompt_length: Prompts longer than this many tokens are skipped and counted.
        on_bad_row: `raise` on a malformed row (naming it), or `skip` and count it; `null` = the preset's choice.
        train_limit: Use only the first N training rows (after filtering); `null` = all.
        train_fraction: Use a random fraction of the training rows (e.g. 0.5 for the half-data arm).
        val_limit: Use only the first N validation rows.
        prompts_per_step: Prompts per training step on each rank (each gets G completions).
        val_batch_size: Prompts per validation step.
        schedule: The data schedule (sampler) and its knobs.
        num_workers: DataLoader workers (0 is right for tokenized prompts in memory).
    """

    def __init__(
        self,
        train_data: str = "openai/gsm8k:main:train",
        val_data: str | None = None,
        test_data: str | None = None,
        preset: str = "gsm8k",
        question_field: str | None = None,
        answer_field: str | None = None,
        prompt: str = "paper",
        system_prompt: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tokenizer: str = "builtin",
        trust_remote_code: bool = False,
        max_prompt_length: int = 512,
        on_bad_row: str | None = None,
        train_limit: int | None = None,
        train_fraction: float | None = None,
        val_limit: int | None = None,
        prompts_per_step: int = 8,
        val_batch_size: int = 16,
        schedule: ScheduleSettings | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if preset not in DATASET_PRESETS:
            raise ValueError(f"preset={preset!r} is unknown; allowed: {', '.join(DATASET_PRESETS)}")
        if on_bad_row not in (None, "raise", "skip"):
            raise ValueError(f"on_bad_row={on_bad_row!r}: allowed values are 'raise', 'skip'")
        if prompts_per_step < 1 or val_batch_size < 1:
            raise ValueError("prompts_per_step and val_batch_size must be >= 1")
        if train_fraction is not None and not 0 < train_fraction <= 1:
            raise ValueError(f"train_fraction={train_fraction} must be in (0, 1]")
        self.schedule = schedule or ScheduleSettings()
        self.save_hyperparameters(ignore=["schedule"])
        self.hparams["schedule"] = asdict(self.schedule)
        self.template = get_prompt_template(prompt)
        if system_prompt is not None:
            self.template = type(self.template)(**{**asdict(self.template), "system_prompt": system_prompt})
        self._tokenizer = None
        self.train_set: list[dict] | None = None
        self.val_set: list[dict] | None = None
        self.test_set: list[dict] | None = None
        self.summary: dict[str, Any] = {}
        self.sampler = None
        self.ranking: list[int] | None = None
        self._pending_state: dict | None = None

    # ----------------------------------------------------------------- building prompts
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from gainrl_pl.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.hparams.tokenizer, trust_remote_code=self.hparams.trust_remote_code)
        return self._tokenizer

    def _fields(self):
        preset = DATASET_PRESETS[self.hparams.preset]
        overrides = {k: v for k, v in (("question_field", self.hparams.question_field),
                                       ("answer_field", self.hparams.answer_field)) if v}
        return type(preset)(**{**asdict(preset), **overrides}) if overrides else preset

    def build_split(self, source: str, name: str, limit: int | None = None, fraction: float | None = None):
        """Load rows, validate them, render prompts; returns the dataset (list of dicts) and a summary."""
        rows = load_rows(str(resolve_data_path(source)))
        examples, report = build_examples(rows, self._fields(), on_bad_row=self.hparams.on_bad_row)
        if fraction is not None and fraction < 1:
            gen = torch.Generator().manual_seed(self.schedule.seed)
            keep = sorted(torch.randperm(len(examples), generator=gen)[: max(1, round(fraction * len(examples)))].tolist())
            examples = [examples[i] for i in keep]
        if limit is not None:
            examples = examples[:limit]
        _check_one_prompt_kind(examples, source)
        items, too_long = [], 0
        for ex in examples:
            messages = ex.messages if ex.messages is not None else self.template.messages(ex.question)
            try:
                if ex.messages is not None:  # TRL's conversational format: rendered as it is
                    seg = build_chat_prompt(self.tokenizer, ex.messages, max_length=self.hparams.max_prompt_length,
                                            chat_template_kwargs=self.hparams.chat_template_kwargs)
                else:
                    seg = build_prompt(self.tokenizer, ex.question, self.template,
                                       max_length=self.hparams.max_prompt_length,
                                       chat_template_kwargs=self.hparams.chat_template_kwargs)
            except PromptTooLongError:
                too_long += 1
                continue
            columns = {**ex.columns, "answer": ex.answer}
            # prompt_messages / conversational: what reward functions written for TRL's chat format receive
            items.append({"index": ex.index, "input_ids": seg.input_ids, "prompt": seg.text,
                          "question": ex.question, "question_tokens": seg.num_question_tokens,
                          "segments": seg, "columns": columns, "prompt_messages": messages,
                          "conversational": ex.messages is not None})
        if not items:
            raise ValueError(f"{name} data {source!r} has no usable rows ({len(rows)} rows, {too_long} over "
                             f"max_prompt_length={self.hparams.max_prompt_length}); check the fields and the limit")
        summary = {"rows": len(rows), "used": len(items), "too_long": too_long,
                   "conversational": examples[0].messages is not None if examples else False, **report.as_dict()}
        return items, summary

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit") and self.train_set is None:
            self.train_set, self.summary["train"] = self.build_split(hp.train_data, "train", hp.train_limit,
                                                                     hp.train_fraction)
            self._build_sampler()
        if stage in (None, "fit", "validate") and hp.val_data and self.val_set is None:
            self.val_set, self.summary["val"] = self.build_split(hp.val_data, "val", hp.val_limit)
        if stage in (None, "test") and (hp.test_data or hp.val_data) and self.test_set is None:
            self.test_set, self.summary["test"] = self.build_split(hp.test_data or hp.val_data, "test", hp.val_limit)

    def _build_sampler(self) -> None:
        s = self.schedule
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        kwargs = dict(num_prompts=len(self.train_set), subset_size=min(s.subset_size, len(self.train_set)),
                      batch_size=self.hparams.prompts_per_step, seed=s.seed, num_replicas=world, rank=rank)
        if s.name in ("angle", "length", "accuracy_curriculum"):
            kwargs.update(sigma=s.sigma, mu=s.initial_mu, step_size=s.step_size, sensitivity=s.sensitivity,
                          target_accuracy=s.target_accuracy, min_shift=s.min_shift, max_shift=s.max_shift,
                          reference_lag=s.reference_lag)
        if s.name == "adarft":
            kwargs["difficulty"] = self.column_values(s.difficulty_field)
            del kwargs["num_prompts"]  # implied by the difficulty list
        kwargs.update(s.extra)
        self.sampler = build_sampler(s.name, **kwargs)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    def column_values(self, field_name: str | None) -> list[float]:
        """Finite numeric values of a dataset column for every training prompt (e.g. MATH `level`)."""
        if not field_name:
            raise ValueError(f"schedule.name={self.schedule.name!r} needs schedule.difficulty_field (a numeric "
                             "column such as MATH's `level`)")
        values = []
        for item in self.train_set:
            raw = item["columns"].get(field_name)
            try:
                value = float(str(raw).replace("Level", "").strip())
            except ValueError:
                value = math.nan
            if not math.isfinite(value):  # a NaN would sort anywhere: the ranking would be silently arbitrary
                raise ValueError(f"row {item['index']}: {field_name}={raw!r} is not a finite number; schedule "
                                 f"{self.schedule.name!r} needs one on every training row (fill or drop those rows)")
            values.append(value)
        return values

    def set_ranking(self, order: list[int]) -> None:
        """Install a ranking (positions into the training set, best first) in the sampler."""
        self.ranking = list(map(int, order))
        self.sampler.set_ranking(self.ranking)

    # ----------------------------------------------------------------- loaders
    def collate(self, items: list[dict]) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):  # left padding: generation appends on the right
            n = len(it["input_ids"])
            ids[row, width - n:] = torch.tensor(it["input_ids"])
            mask[row, width - n:] = 1
        keys = items[0]["columns"].keys()
        return {"input_ids": ids, "attention_mask": mask,
                "index": torch.tensor([it["position"] for it in items]),
                "prompt": [it["prompt"] for it in items],
                "prompt_messages": [it["prompt_messages"] for it in items],
                "conversational": [it["conversational"] for it in items],
                "is_padding": torch.tensor([it.get("is_padding", False) for it in items]),
                "columns": {k: [it["columns"].get(k) for it in items] for k in keys}}

    def _with_positions(self, items: list[dict]) -> list[dict]:
        return [{**it, "position": pos} for pos, it in enumerate(items)]

    def train_dataloader(self) -> DataLoader:
        if self.ranking is None and self.schedule.name in ("angle", "length", "accuracy_curriculum"):
            raise RuntimeError(f"schedule {self.schedule.name!r} has no ranking yet: add the GainRLScheduler "
                               "callback (the CLI always does), or call datamodule.set_ranking(order)")
        # A private generator: each DataLoader iteration draws a base seed, and from the global torch RNG that
        # draw would shift the rollouts' sampling stream between a checkpoint and its resumed run.
        return DataLoader(self._with_positions(self.train_set), batch_sampler=self.sampler, collate_fn=self.collate,
                          num_workers=self.hparams.num_workers, generator=torch.Generator().manual_seed(0))

    def _eval_loader(self, items) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        # Strided shards padded to equal length: every eval step goes through DDP's forward, which
        # broadcasts buffers (a collective), so ranks with fewer batches would deadlock the others. The
        # padding rows are flagged and left out of every metric, so no prompt counts twice.
        items = self._with_positions(items)
        per_rank = -(-len(items) // world)
        shard = [{**it, "is_padding": False} for it in items[rank::world]]
        shard += [{**items[i % len(items)], "is_padding": True} for i in range(per_rank - len(shard))]
        return DataLoader(shard, batch_size=self.hparams.val_batch_size, shuffle=False, collate_fn=self.collate)

    def val_dataloader(self):
        return self._eval_loader(self.val_set) if self.val_set else []

    def test_dataloader(self):
        return self._eval_loader(self.test_set) if self.test_set else []

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:
            return {}
        return {"sampler": self.sampler.state_dict(), "ranking": self.ranking}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sampler is None:  # restored before setup: apply once the sampler exists
            self._pending_state = state
        else:
            self._apply_state(state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("ranking") is not None:
            self.set_ranking(state["ranking"])
        self.sampler.load_state_dict(state["sampler"])


def _check_one_prompt_kind(examples, source: str) -> None:
    """A dataset's prompts are all text or all chat messages: TRL decides the reward format once per dataset."""
    kinds = {}
    for ex in examples:
        kinds.setdefault(ex.messages is not None, ex.index)
        if len(kinds) == 2:
            raise DataError(f"{source}: row {kinds[True]} holds chat messages but row {kinds[False]} a text question; "
                            "a dataset's prompts must all be one or the other (convert the text rows to "
                            '[{"role": "user", "content": ...}])')
