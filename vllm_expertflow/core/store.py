"""Backing stores: where every expert's weights live while the pool holds only some of them.

An expert is stored in the compute kernel's own layout, so a load is a plain copy into a slot.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertLayout:
    """Shapes of one expert's fused gate/up (`w13`) and down (`w2`) weights, kernel layout."""

    w13_shape: tuple[int, ...]
    w2_shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def w13_bytes(self) -> int:
        return math.prod(self.w13_shape) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.w13_bytes + math.prod(self.w2_shape) * self.dtype.itemsize

    def split(self, record: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views one flat uint8 expert record as its (w13, w2) weights."""
        w13 = record[: self.w13_bytes].view(self.dtype).view(self.w13_shape)
        w2 = record[self.w13_bytes : self.nbytes].view(self.dtype).view(self.w2_shape)
        return w13, w2

    def as_json(self) -> dict:
        return {
            "w13_shape": list(self.w13_shape),
            "w2_shape": list(self.w2_shape),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


class ExpertStore(ABC):
    """All experts of all MoE layers, in one layout. Each layer is written once, then read."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.layout: ExpertLayout | None = None

    @abstractmethod
    def has_layer(self, layer: int) -> bool:
        """True when the layer is stored and readable (a reused disk store starts so)."""

    def write_layer(self, layer: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Stores all experts of one layer, `w13: [E, ...]`, `w2: [E, ...]` in kernel layout."""
        assert not self.has_layer(layer), f"layer {layer} is already stored"
        assert w13.shape[0] == w2.shape[0] == self.num_experts
        layout = ExpertLayout(tuple(w13.shape[1:]), tuple(w2.shape[1:]), w13.dtype)
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ValueError(f"layer {layer} has expert layout {layout}, others {self.layout}")
        self._write_layer(layer, w13, w2)

    @abstractmethod
    def _write_layer(self, layer: int, w13: torch.Tensor, w2: torch.Tensor) -> None: ...

    def finish_writing(self) -> None:
        """Makes the written layers durable; called once every layer is stored."""

    @abstractmethod
    def read_expert(
        self, layer: int, expert: int, w13_out: torch.Tensor, w2_out: torch.Tensor
    ) -> None:
        """Copies one expert into the given slot tensors (asynchronously on CUDA)."""

    def close(self) -> None:
        """Releases files and buffers."""


class RamStore(ExpertStore):
    """Experts in host memory, page-locked when the pool is on a GPU so copies can overlap."""

    def __init__(self, num_experts: int, pin_memory: bool) -> None:
        super().__init__(num_experts)
        self._pin_memory = pin_memory
        self._weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def has_layer(self, layer: int) -> bool:
        return layer in self._weights

    def _write_layer(self, layer: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        self._weights[layer] = (self._to_host(w13), self._to_host(w2))

    def _to_host(self, weights: torch.Tensor) -> torch.Tensor:
        host = weights.to("cpu", copy=True).contiguous()
        return host.pin_memory() if self._pin_memory else host

    def read_expert(
        self, layer: int, expert: int, w13_out: torch.Tensor, w2_out: torch.Tensor
    ) -> None:
        w13, w2 = self._weights[layer]
        w13_out.copy_(w13[expert], non_blocking=True)
        w2_out.copy_(w2[expert], non_blocking=True)
