"""Backing stores: where every expert's weights live while the pool holds only some of them.

An expert is stored as one record, either in the compute kernel's own layout (a load is a plain
copy into a slot) or compressed (a codec expands it into the slot on load).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_json(cls, spec: dict) -> TensorSpec:
        return cls(spec["name"], tuple(spec["shape"]), getattr(torch, spec["dtype"]))


@dataclass(frozen=True)
class ExpertLayout:
    """One expert's stored tensors, back to back in one record (one read per load).

    A plain store holds `w13` (fused gate/up) and `w2` (down) in the kernel's layout, and the
    experts' biases (`w13_bias`, `w2_bias`) where the model has them; a quantized one holds the
    packed weights with their scales, which a codec expands on load.
    """

    parts: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> ExpertLayout:
        """The layout of one expert of `tensors`, each `[num_experts, ...]`."""
        return cls(tuple(TensorSpec(n, tuple(t.shape[1:]), t.dtype) for n, t in tensors.items()))

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def split(self, record: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views one flat uint8 expert record as its named tensors."""
        views, offset = {}, 0
        for part in self.parts:
            raw = record[offset : offset + part.nbytes]
            views[part.name] = raw.view(part.dtype).view(part.shape)
            offset += part.nbytes
        return views

    def as_json(self) -> list[dict]:
        return [part.as_json() for part in self.parts]

    @classmethod
    def from_json(cls, parts: list[dict]) -> ExpertLayout:
        return cls(tuple(TensorSpec.from_json(part) for part in parts))


class ExpertCodec:
    """Turns stored expert records into the kernel's slot weights: here, a plain copy.

    Subclasses decode compressed records (e.g. int4 with group scales), either as a load lands
    in its slot or, when the pool keeps records as stored, into a scratch right before the kernel.
    """

    def slot_specs(self, layout: ExpertLayout) -> tuple[TensorSpec, ...]:
        """One slot's named tensors: `w13` and `w2`, and any others the kernel reads."""
        return layout.parts

    def decode(self, records: dict[str, torch.Tensor], slots: dict[str, torch.Tensor]) -> None:
        """Writes n experts' records into n slots, every tensor `[n, ...]` (asynchronously on
        CUDA)."""
        for name, out in slots.items():
            out.copy_(records[name], non_blocking=True)


class ExpertStore(ABC):
    """All experts of all MoE layers, in one layout. Each layer is written once, then read."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.layout: ExpertLayout | None = None

    @abstractmethod
    def has_layer(self, layer: int) -> bool:
        """True when the layer is stored and readable (a reused disk store starts so)."""

    def write_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """Stores all experts of one layer: named tensors, each `[num_experts, ...]`."""
        assert not self.has_layer(layer), f"layer {layer} is already stored"
        assert all(t.shape[0] == self.num_experts for t in tensors.values())
        layout = ExpertLayout.of(tensors)
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ValueError(f"layer {layer} has expert layout {layout}, others {self.layout}")
        self._write_layer(layer, tensors)

    @abstractmethod
    def _write_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None: ...

    def finish_writing(self) -> None:
        """Makes the written layers durable; called once every layer is stored."""

    @abstractmethod
    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's record in host memory, valid until this thread's next read."""

    def close(self) -> None:
        """Releases files and buffers."""


class RamStore(ExpertStore):
    """Experts in host memory, page-locked when the pool is on a GPU so copies can overlap."""

    def __init__(self, num_experts: int, pin_memory: bool) -> None:
        super().__init__(num_experts)
        self._pin_memory = pin_memory
        self._weights: dict[int, dict[str, torch.Tensor]] = {}

    def has_layer(self, layer: int) -> bool:
        return layer in self._weights

    def _write_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        self._weights[layer] = {name: self._to_host(t) for name, t in tensors.items()}

    def _to_host(self, weights: torch.Tensor) -> torch.Tensor:
        host = weights.to("cpu", copy=True).contiguous()
        return host.pin_memory() if self._pin_memory else host

    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return {name: t[expert] for name, t in self._weights[layer].items()}

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """One layer's tensors `[num_experts, ...]`, at a fixed address for zero-copy kernels."""
        return self._weights[layer]
