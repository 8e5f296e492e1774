"""Next-layer expert predictors: from what MoE layer L sees, score the experts of later layers.

Every predictor answers the same question: given layer L's router input `hidden [T, H]` and its
routed `topk_ids [T, k]`, how likely is each expert of the `depth`-th MoE layer after L to be
routed for each token (`[T, E]`, higher is likelier)? Layers are named by their model index;
`layers` lists the MoE layers in order, so depth 1 after `layers[i]` is `layers[i + 1]`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ExpertPredictor(ABC):
    def __init__(self, layers: list[int], max_depth: int) -> None:
        self.layers = list(layers)
        self.max_depth = max_depth

    def target_layer(self, layer: int, depth: int) -> int | None:
        """The MoE layer `depth` layers after `layer`, or None past the last one."""
        index = self.layers.index(layer) + depth
        return self.layers[index] if index < len(self.layers) else None

    @abstractmethod
    def scores(
        self, layer: int, depth: int, hidden: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """`[T, E]` scores of the target layer's experts, one row per token."""

    def predict_experts(
        self, layer: int, depth: int, hidden: torch.Tensor, topk_ids: torch.Tensor, k: int
    ) -> torch.Tensor:
        """The `k` likeliest experts per token, `[T, k]`."""
        return self.scores(layer, depth, hidden, topk_ids).topk(k, dim=-1).indices


class GatePredictor(ExpertPredictor):
    """Speculative gating: layer L+d's own router applied to layer L's router input.

    Works because the residual stream changes little from one layer to the next; needs no
    training, only the gate weights `[E, H]` of every MoE layer.
    """

    def __init__(self, gates: dict[int, torch.Tensor], max_depth: int = 1) -> None:
        super().__init__(sorted(gates), max_depth)
        self._gates = {layer: w.float() for layer, w in gates.items()}

    def scores(
        self, layer: int, depth: int, hidden: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        target = self.target_layer(layer, depth)
        gate = self._gates[target]
        return hidden.to(gate.device, torch.float32) @ gate.T


def recall_at_k(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    """Share of the truly routed experts found in a predicted set of the same size.

    `predicted` and `actual` are `[T, k]` expert ids.
    """
    hits = (predicted.unsqueeze(-1) == actual.unsqueeze(-2)).any(-1).sum()
    return hits.item() / actual.numel()
