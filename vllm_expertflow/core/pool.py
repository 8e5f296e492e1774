"""The paged expert pool: a fixed number of expert slots on the compute device.

Every MoE layer shares the same slots, the way every request shares vLLM's KV blocks. A step
pins the experts it needs, loads the misses from the backing store, runs the kernel on the slot
tensors and releases the pins.
"""

from __future__ import annotations

import time

import torch

from .page_table import PageTable
from .policy import EvictionPolicy
from .stats import OffloadStats
from .store import ExpertStore


class ExpertPool:
    def __init__(
        self,
        store: ExpertStore,
        num_slots: int,
        device: torch.device,
        policy: EvictionPolicy,
        stats: OffloadStats,
    ) -> None:
        layout = store.layout
        assert layout is not None, "the pool is built after the store is written"
        self.store = store
        self.stats = stats
        self.table = PageTable(num_slots, policy)
        self.w13 = torch.empty((num_slots, *layout.w13_shape), dtype=layout.dtype, device=device)
        self.w2 = torch.empty((num_slots, *layout.w2_shape), dtype=layout.dtype, device=device)
        # Loads go on their own stream so compute already queued is not held up behind them.
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def num_slots(self) -> int:
        return self.table.num_slots

    def ensure_resident(self, layer: int, experts: list[int]) -> list[int]:
        """Pins `experts` of `layer` in slots, loading the misses; returns their slots in order.

        Hits are pinned before any miss is placed so a load never evicts an expert this step
        needs. The caller must `release` the slots once its kernel has run.
        """
        assert len(experts) <= self.num_slots, "more experts than slots: split the step"
        slots: list[int | None] = [self.table.lookup((layer, e)) for e in experts]
        for slot in slots:
            if slot is not None:
                self.table.pin(slot)
                self.table.touch(slot)
        misses = [i for i, slot in enumerate(slots) if slot is None]
        self.stats.record_lookups(layer, len(experts) - len(misses), len(misses))
        for i in misses:
            slot, _ = self.table.allocate((layer, experts[i]))
            self.table.pin(slot)
            self._load(layer, experts[i], slot)
            slots[i] = slot
        if misses and self._copy_stream is not None:
            torch.cuda.current_stream().wait_stream(self._copy_stream)
        return slots  # type: ignore[return-value]

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.table.unpin(slot)

    def _load(self, layer: int, expert: int, slot: int) -> None:
        start = time.perf_counter()
        if self._copy_stream is None:
            self.store.read_expert(layer, expert, self.w13[slot], self.w2[slot])
        else:
            # A slot released this step may still be read by a queued kernel: load after it.
            self._copy_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._copy_stream):
                self.store.read_expert(layer, expert, self.w13[slot], self.w2[slot])
        self.stats.record_load(layer, self.store.layout.nbytes, time.perf_counter() - start)
