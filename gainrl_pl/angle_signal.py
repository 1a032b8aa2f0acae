"""The rollouts' angle signal (spec section 5), read off the training forward pass with no extra forward.

A hook at the scoring site sees the same hidden states the prompt scorer uses (the ranking and the signal
share one `layer`/`site` setting, the GainRLScheduler's); while capture is on, it reduces them at once to
one number per sequence (mean pairwise cosine over the prompt+completion tokens), so nothing of size L x d
is kept alive for the backward pass.
"""

from __future__ import annotations

import contextlib

import torch

from gainrl_pl.angles import mean_pairwise_cosine


class AngleSignalProbe:
    """Collects the per-sequence mean cosine at one layer and site during selected forwards.

    Args:
        model: The policy (plain or peft-wrapped).
        layer: Decoder layer index; negative counts from the end.
        site: `mlp_input` (the layer's MLP input, as the paper) or `layer_output` (the layer's output).
    """

    def __init__(self, model: torch.nn.Module, layer: int = -1, site: str = "mlp_input") -> None:
        self._model = model
        self._handle = None
        self._mask: torch.Tensor | None = None
        self._values: list[torch.Tensor] = []
        self.set_site(layer, site)

    def set_site(self, layer: int, site: str) -> None:
        """Move the probe to `layer` (negative counts from the end) and `site`; ValueError if out of range."""
        from gainrl_pl.scoring import check_site, decoder_layer, find_decoder_layers

        check_site(site)
        block = decoder_layer(find_decoder_layers(self._model), layer)
        if self._handle is not None:
            self._handle.remove()
        if site == "mlp_input":
            self._handle = block.mlp.register_forward_pre_hook(self._mlp_input_hook)
        else:
            self._handle = block.register_forward_hook(self._layer_output_hook)
        self.layer, self.site = layer, site

    # bound methods, not lambdas: the model stays picklable (ddp_spawn)
    def _mlp_input_hook(self, module, args) -> None:
        self._capture(args[0])

    def _layer_output_hook(self, module, args, output) -> None:
        self._capture(output[0] if isinstance(output, tuple) else output)

    def _capture(self, hidden: torch.Tensor) -> None:
        if self._mask is None:
            return
        with torch.no_grad():
            self._values.append(mean_pairwise_cosine(hidden.detach(), self._mask.bool()).float().cpu())
        self._mask = None  # one capture per forward: gradient-checkpoint recomputation must not add a second

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
