"""`AngleScorer`: angle-concentration scores of prompts from one prefill forward (spec sections 2, 3, 8).

The forward runs the model body only up to the scoring layer: a hook captures the hidden states and
raises a private exception, so later layers, the final norm and the LM head never run. Prompts are
length-bucketed into batches, padded on the tokenizer's side, and each batch is reduced at once to
per-prompt numbers, so memory is bounded by one batch. Scores are cached on disk per (model weights,
layer, site, prompt tokens, weights); the cache is plain JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gainrl_pl.angles import angle_concentration, weighted_score
from gainrl_pl.data.prompts import PromptSegments
from gainrl_pl.models import position_ids_from_mask

SITES = ("mlp_input", "layer_output")
"""`mlp_input`: input of the layer's MLP = output of its post-attention norm (paper, default);
`layer_output`: the decoder layer's output (residual stream)."""

_CACHE_FORMAT = "gainrl-angle-scores-v1"


@dataclass(frozen=True)
class PromptScore:
    """One prompt's score. `index` is its position in the list given to `AngleScorer.score`."""

    index: int
    score: float
    intra: float
    inter: float
    num_tokens: int


class _StopForward(Exception):
    """Raised by the capture hook to leave the forward pass once the target layer has run."""


def _find_body_and_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder-layer list (the longest ModuleList of blocks that have an `.mlp`) and the module that
    owns it (the model body, e.g. `LlamaModel`). Name-agnostic, so it sees through peft wrappers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(m, "mlp") for m in module):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None or not best[0]:
        raise ValueError(f"could not find the decoder layers of {type(model).__name__}: expected an "
                         "nn.ModuleList of transformer blocks with an `.mlp` (as in Llama, Qwen2, Mistral)")
    parent = best[0].rpartition(".")[0]
    return (model.get_submodule(parent) if parent else model), best[1]


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF causal LM (plain or peft-wrapped); ValueError if it has none."""
    return _find_body_and_layers(model)[1]


def check_site(site: str) -> str:
    """`site` if it is one of `SITES`; ValueError naming the allowed ones otherwise."""
    if site not in SITES:
        raise ValueError(f"site={site!r} is not a scoring site; allowed: {', '.join(SITES)}")
    return site


def decoder_layer(layers: nn.ModuleList, layer: int) -> nn.Module:
    """Decoder layer `layer` (negative counts from the end); ValueError naming the allowed range otherwise."""
    n = len(layers)
    if not -n <= layer < n:
        raise ValueError(f"layer={layer} is out of range for a model with {n} decoder layers "
                         f"(allowed: {-n}..{n - 1})")
    return layers[layer]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def segment_masks(batch: Sequence[PromptSegments], attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool masks [B, L] of each padded row's question and prefix tokens (pads are in neither).

    Each row's real tokens start after its leading pads (left padding) or at 0 (right padding); the
    segments' token ranges count from there.
    """
    attention = attention.bool()
    offset = (attention.long().cumsum(-1) == 0).sum(-1)
    rel = torch.arange(attention.shape[1], device=attention.device).unsqueeze(0) - offset.unsqueeze(1)

    def span(ranges: list[tuple[int, int]]) -> torch.Tensor:
        lo = torch.tensor([r[0] for r in ranges], device=attention.device).unsqueeze(1)
        hi = torch.tensor([r[1] for r in ranges], device=attention.device).unsqueeze(1)
        return (rel >= lo) & (rel < hi) & attention

    return span([p.question for p in batch]), span([p.prefix for p in batch])


class AngleScorer:
    """Scores prompts by angle concentration at one layer of `model` (spec section 2).

    Args:
        model: A HF causal LM (plain or peft-wrapped), on its device.
        tokenizer: The tokenizer the prompts were built with; its `padding_side` and pad token are used.
        layer: Decoder layer index; negative counts from the end (default: the last layer).
        site: `mlp_input` (the MLP's input, i.e. the post-attention norm's output: the paper's choice)
            or `layer_output`.
        batch_size: Prompts per forward; memory grows with batch_size x longest prompt in the batch.
        w_intra: Weight of C_intra in the score.
        w_inter: Weight of C_inter (paper 1; the reference script uses 8).
        intra_diagonal: C_intra with the diagonal (paper) or over i != j pairs only.
        show_progress: Show a tqdm progress bar.
    """

    def __init__(self, model: nn.Module, tokenizer, *, layer: int = -1, site: str = "mlp_input",
                 batch_size: int = 16, w_intra: float = 1.0, w_inter: float = 1.0, intra_diagonal: bool = True,
                 show_progress: bool = True) -> None:
        check_site(site)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.body, layers = _find_body_and_layers(model)
        block = decoder_layer(layers, layer)
        self.model, self.tokenizer = model, tokenizer
        self.layer, self.site, self.batch_size = layer, site, batch_size
        self.w_intra, self.w_inter, self.intra_diagonal = w_intra, w_inter, intra_diagonal
        self.show_progress = show_progress
        self._hook_module = block.mlp if site == "mlp_input" else block
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to eos)")

    # ----------------------------------------------------------------- capture
    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, d] at the scoring site; the forward stops right after capturing them."""
        captured: list[torch.Tensor] = []

        def pre_hook(module, args, kwargs):
            captured.append(args[0] if args else next(iter(kwargs.values())))
            raise _StopForward

        def post_hook(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        if self.site == "mlp_input":
            handle = self._hook_module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:
            handle = self._hook_module.register_forward_hook(post_hook)
        try:
            self.body(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"the forward of {type(self.body).__name__} never reached decoder layer "
                               f"{self.layer} ({self.site})")
        return captured[0]

    def _batch_scores(self, batch: list[PromptSegments], device: torch.device) -> list[tuple[float, ...]]:
        padded = self.tokenizer.pad({"input_ids": [p.input_ids for p in batch]}, return_tensors="pt")
        input_ids = padded["input_ids"].to(device)
        attention = padded["attention_mask"].to(device).bool()
        hidden = self._hidden(input_ids, attention.long())
        question, prefix = segment_masks(batch, attention)
        result = angle_concentration(hidden, question, prefix, intra_diagonal=self.intra_diagonal)
        score = weighted_score(result.intra, result.inter, self.w_intra, self.w_inter)
        rows = torch.stack([score, result.intra, result.inter]).float().cpu()
        return [tuple(float(v) for v in rows[:, i]) for i in range(len(batch))]

    # ----------------------------------------------------------------- public
    def score(self, prompts: Sequence[PromptSegments]) -> list[PromptScore]:
        """Score each prompt; returns one `PromptScore` per prompt, in input order (no cache: see
        `scheduling.angle_ranking`, which decides cache hits once for every DDP rank)."""
        return self._score(prompts)

    def _score(self, prompts: Sequence[PromptSegments]) -> list[PromptScore]:
        from tqdm.auto import tqdm

        for i, p in enumerate(prompts):
            if not isinstance(p, PromptSegments):
                raise TypeError(f"prompts[{i}] is {type(p).__name__}; build prompts with prompts.build_prompt")
        # Length bucketing: longest first, so an out-of-memory batch shows up at once, and similar
        # lengths share a batch so little compute goes to padding.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].input_ids))
        device = _model_device(self.model)
        out: list[PromptScore | None] = [None] * len(prompts)
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()  # no dropout; restored module by module below
        try:
            with torch.inference_mode(), tqdm(total=len(prompts), desc="angle scores", unit="prompt",
                                              disable=not self.show_progress) as bar:
                for lo in range(0, len(order), self.batch_size):
                    idx = order[lo:lo + self.batch_size]
                    values = self._batch_scores([prompts[i] for i in idx], device)
                    for i, (score, intra, inter) in zip(idx, values, strict=True):
                        out[i] = PromptScore(i, score, intra, inter, len(prompts[i].input_ids))
                    bar.update(len(idx))
        finally:
            for module, training in modes.items():
                module.training = training
        return out  # type: ignore[return-value]


# --------------------------------------------------------------------- ranking


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..N with ties given their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (scipy if installed); None when undefined (N < 2 or a constant input)."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} vs {len(y)} values")
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    try:
        from scipy.stats import spearmanr
    except ImportError:
        rx, ry = _ranks(x), _ranks(y)
        mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
        cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
        return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return float(spearmanr(x, y).statistic)


def ranking_summary(scores: Sequence[PromptScore], question_lengths: Sequence[int]) -> dict[str, Any]:
    """What spec section 8 asks to log with every ranking: N, the score's mean/sd/min/max, the means of
    C_intra and C_inter, and Spearman(score, question length in tokens) (near +-1 = ordering by length)."""
    if len(scores) != len(question_lengths):
        raise ValueError(f"{len(scores)} scores but {len(question_lengths)} question lengths")
    values = [s.score for s in scores]
    n = len(values)
    if n == 0:
        return {"num_prompts": 0}
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"num_prompts": n, "score_mean": mean, "score_sd": sd, "score_min": min(values),
            "score_max": max(values), "intra_mean": sum(s.intra for s in scores) / n,
            "inter_mean": sum(s.inter for s in scores) / n,
            "spearman_score_question_length": spearman(values, [float(q) for q in question_lengths])}


# --------------------------------------------------------------------- cache
def model_fingerprint(model: nn.Module, values_per_tensor: int = 16) -> str:
    """sha256 over every parameter's name, shape, dtype and a strided sample of its values.

    Sampling every tensor (not just a few) matters: a LoRA policy differs from its base only in the
    adapter tensors, and those start at zero.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
            flat = p.detach().reshape(-1)
            if flat.numel() == 0 or flat.is_meta:
                continue
            # integer strides: float32 linspace rounds numel - 1 up past the end for tensors above 2**24
            k = min(values_per_tensor, flat.numel())
            idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temp file in the same directory and os.replace: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ScoreCache:
    """Angle scores on disk: `<key>.jsonl` (one PromptScore per line) + `<key>.meta.json` (what was
    scored, and the ranking summary). Loaded with `json` only; the meta file is written last, so a
    key without it counts as absent.

    Args:
        directory: Where to keep the files; default `$GAINRL_PL_CACHE/scores` (~/.cache/gainrl_pl/scores).
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        if directory is None:
            from gainrl_pl.models import cache_root

            directory = cache_root() / "scores"
        self.directory = Path(directory)
        self._described: dict[str, dict[str, Any]] = {}

    def key(self, model: nn.Module, prompts: Sequence[PromptSegments], *, layer: int, site: str,
            w_intra: float, w_inter: float, intra_diagonal: bool, model_id: str = "") -> str:
        """sha256 of everything a score depends on: model identity (`model_id` or the config's
        name_or_path, plus a fingerprint of the weights' values), layer, site, the exact token ids and
        segment ranges of all prompts, the weights and `intra_diagonal`."""
        name = model_id or str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)
        described = {"format": _CACHE_FORMAT, "model": name, "fingerprint": model_fingerprint(model),
                     "layer": layer, "site": site, "w_intra": float(w_intra), "w_inter": float(w_inter),
                     "intra_diagonal": bool(intra_diagonal), "num_prompts": len(prompts)}
        h = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
        for p in prompts:
            h.update(json.dumps([p.input_ids, p.prefix, p.question, p.suffix]).encode())
        key = h.hexdigest()
        self._described[key] = described
        return key

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.jsonl", self.directory / f"{key}.meta.json"

    def load(self, key: str) -> list[PromptScore] | None:
        """The cached scores for `key`, or None if absent or unreadable (then they are recomputed)."""
        data, meta = self._paths(key)
        if not meta.exists() or not data.exists():
            return None
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
            with open(data, encoding="utf-8") as fh:
                scores = [PromptScore(**json.loads(line)) for line in fh if line.strip()]
        except (OSError, ValueError, TypeError) as err:
            warnings.warn(f"ignoring unreadable score cache {data}: {err}", stacklevel=2)
            return None
        if len(scores) != info.get("num_prompts"):
            warnings.warn(f"ignoring score cache {data}: {len(scores)} rows, meta says {info.get('num_prompts')}",
                          stacklevel=2)
            return None
        return scores

    def save(self, key: str, scores: Sequence[PromptScore], summary: dict[str, Any] | None = None) -> None:
        """Store scores and their ranking summary under `key` (atomically: data first, then meta)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data, meta = self._paths(key)
        # repr-exact floats: json round-trips Python floats bit for bit, so a ranking never changes.
        _atomic_write(data, "".join(json.dumps(asdict(s)) + "\n" for s in scores))
        info = {**self._described.get(key, {}), "key": key, "num_prompts": len(scores),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary or {}}
        _atomic_write(meta, json.dumps(info, indent=1, sort_keys=True))
