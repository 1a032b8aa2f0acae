"""The rollouts' angle signal (spec section 5), read off the training forward pass with no extra forward.

A forward pre-hook on the scoring layer's MLP sees the same hidden states the prompt scorer uses; while
capture is on, it reduces them at once to one number per sequence (mean pairwise cosine over the
prompt+completion tokens), so nothing of size L x d is kept alive for the backward pass.
"""

from __future__ import annotations

import contextlib

import torch

from gainrl_pl.angles import mean_pairwise_cosine


class AngleSignalProbe:
    """Collects the per-sequence mean cosine at `layer`'s MLP input during selected forwards."""

    def __init__(self, model: torch.nn.Module, layer: int = -1) -> None:
        from gainrl_pl.scoring import find_decoder_layers

        layers = find_decoder_layers(model)
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"angle_layer={layer} is out of range for a model with {len(layers)} decoder layers "
                             f"(allowed: {-len(layers)}..{len(layers) - 1})")
        self._target = layers[layer].mlp
        self._mask: torch.Tensor | None = None
        self._values: list[torch.Tensor] = []
        self._target.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self._mask is None:
            return None
        with torch.no_grad():
            self._values.append(mean_pairwise_cosine(args[0].detach(), self._mask.bool()).float().cpu())
        self._mask = None  # one capture per forward: gradient-checkpoint recomputation must not add a second
        return None

    @contextlib.contextmanager
    def capture(self, attention_mask: torch.Tensor, enabled: bool = True):
        """Record the signal of the next forward over sequences with this attention mask."""
        self._mask = attention_mask if enabled else None
        try:
            yield
        finally:
            self._mask = None

    def pop_signal(self) -> torch.Tensor:
        """All values captured since the last call, in forward order (one per sequence)."""
        values = torch.cat(self._values) if self._values else torch.zeros(0)
        self._values = []
        return values
