"""A device-resident mirror of the PageTable: `[num_layers, num_experts]` int32 slot ids.

Kernels read it to remap router ids to slots and to find misses without a host sync. Every
update is an in-place write into one fixed tensor, so a captured CUDA graph keeps reading the
same storage and sees the new mapping on its next replay.

Ordering is the caller's job, because the writes run on the current stream: clear an entry on
the compute stream before its slot is overwritten, and set it only after the slot's copy has
landed (on the copy stream after the copy, or after the compute stream waited for the load).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .page_table import PageTable

NOT_RESIDENT = -1


class DevicePageTable:
    def __init__(
        self, layers: int | Sequence[int], num_experts: int, device: torch.device | str
    ) -> None:
        """`layers` is the number of MoE layers (ids 0..n-1) or the list of their layer ids."""
        layer_ids = range(layers) if isinstance(layers, int) else layers
        self._row_of = {layer: row for row, layer in enumerate(layer_ids)}
        assert len(self._row_of) == len(layer_ids), "duplicate layer ids"
        self.num_experts = num_experts
        self.table = torch.full(
            (len(self._row_of), num_experts), NOT_RESIDENT, dtype=torch.int32, device=device
        )

    @property
    def layers(self) -> list[int]:
        return list(self._row_of)

    def row(self, layer: int) -> torch.Tensor:
        """A view of one layer's slot ids: stable storage, safe to capture in a graph."""
        return self.table[self._row_of[layer]]

    def set(self, layer: int, expert: int, slot: int) -> None:
        assert slot >= 0, "use clear() to mark an expert not resident"
        self.table[self._row_of[layer], expert] = slot

    def clear(self, layer: int, expert: int) -> None:
        self.table[self._row_of[layer], expert] = NOT_RESIDENT

    def load_from(self, page_table: PageTable) -> None:
        """Overwrites the whole mirror from the host table with one copy into the same storage."""
        host = torch.full(self.table.shape, NOT_RESIDENT, dtype=torch.int32)
        for layer, expert in page_table.resident_keys():
            if layer in self._row_of:
                host[self._row_of[layer], expert] = page_table.lookup((layer, expert))
        self.table.copy_(host)

    def to_host(self) -> torch.Tensor:
        return self.table.cpu()
