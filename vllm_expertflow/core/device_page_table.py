"""The page table as kernels read it: `[num_layers, num_experts]` int32 slot ids on the device.

The host `PageTable` decides; `ExpertPool` copies each decision here. Kernels read it to remap
router ids to slots (one gather) and, in the graph step, to find misses without a host sync.
Every update is an in-place write into one fixed tensor, so a captured CUDA graph keeps reading
the same storage and sees the new mapping on its next replay.

Ordering is the caller's job, because the writes run on the current stream: clear an entry on
the compute stream before its slot is overwritten, and set it only after the slot's copy has
landed (on the copy stream after the copy, or after the compute stream waited for the load).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NOT_RESIDENT = -1


class DevicePageTable:
    def __init__(self, layers: Sequence[int], num_experts: int, device: torch.device | str) -> None:
        """`layers`: the MoE layers' ids, in any order (they need not start at 0)."""
        self._row_of = {layer: row for row, layer in enumerate(layers)}
        assert len(self._row_of) == len(layers), "duplicate layer ids"
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

    def remap(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """Router ids `[T, k]` as slot ids in the same dtype: valid for resident experts only."""
        # int32 and int64 ids index directly (no int64 copy); any other dtype (uint8 would read
        # as a mask) is widened first. The slot ids come back in the router ids' dtype.
        ids = topk_ids if topk_ids.dtype in (torch.int32, torch.int64) else topk_ids.long()
        return self.row(layer)[ids].to(topk_ids.dtype)

    def set(self, layer: int, expert: int, slot: int) -> None:
        assert slot >= 0, "use clear() to mark an expert not resident"
        self.table[self._row_of[layer], expert] = slot

    def clear(self, layer: int, expert: int) -> None:
        self.table[self._row_of[layer], expert] = NOT_RESIDENT

    def to_host(self) -> torch.Tensor:
        return self.table.cpu()
