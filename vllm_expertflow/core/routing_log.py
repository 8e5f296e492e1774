"""Which experts each MoE layer routed to during one forward, marked on the device.

A forward inside a CUDA graph cannot hand its routing to the host, so it marks the routed experts in
a fixed `[layers, experts]` tensor (an in-place scatter, captured like any kernel); the host reads
and clears the marks between forwards, then books hits and loads misses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RoutingLog:
    def __init__(self, layers: Sequence[int], num_experts: int, device: torch.device | str) -> None:
        self._row_of = {layer: row for row, layer in enumerate(layers)}
        self.marks = torch.zeros(len(self._row_of), num_experts, dtype=torch.int32, device=device)

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Marks the experts `topk_ids [T, k]` picked; no host sync, fixed shapes."""
        self.marks[self._row_of[layer]].index_fill_(0, topk_ids.flatten().long(), 1)

    def collect(self) -> dict[int, list[int]]:
        """The experts each layer used since the last call, in id order; clears the marks.

        Reading the marks waits for the forward that wrote them, which the engine has already
        waited for when it read that forward's sampled tokens.
        """
        marks = self.marks.to("cpu", copy=True)  # .cpu() would alias the marks on a CPU
        self.marks.zero_()
        return {
            layer: marks[row].nonzero().flatten().tolist()
            for layer, row in self._row_of.items()
            if marks[row].any()
        }
