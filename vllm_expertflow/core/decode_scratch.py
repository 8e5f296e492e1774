"""A few kernel-layout slots that a pool of stored (e.g. packed int4) records is decoded into.

When the pool keeps experts as stored, a slot costs the record's bytes (an int4 expert about a
quarter of a bf16 one), so the same memory holds several times the experts. The kernel cannot
read records, so right before each kernel call the step decodes the experts that call uses into
this scratch and hands the kernel scratch ids instead of slot ids.
"""

from __future__ import annotations

import time

import torch

from .pool import ExpertPool
from .store import ExpertCodec


class DecodeScratch:
    def __init__(self, pool: ExpertPool, codec: ExpertCodec, capacity: int) -> None:
        """Decodes `pool`'s slots (records as stored) with `codec`; `capacity`: the most
        distinct experts one kernel call may use."""
        self.pool = pool
        self.codec = codec
        self.capacity = capacity
        self.tensors = {
            spec.name: torch.empty((capacity, *spec.shape), dtype=spec.dtype, device=pool.device)
            for spec in codec.slot_specs(pool.store.layout)
        }

    def decode(
        self, layer: int, slot_ids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Decodes the pool slots `slot_ids` names; returns the ids remapped into the scratch
        and the scratch tensors, for the kernel."""
        start = time.perf_counter()
        used = slot_ids.flatten().unique()  # sorted, so a slot's scratch index is its rank
        count = used.numel()
        assert count <= self.capacity, "more experts than the scratch holds: plan smaller rounds"
        records = {name: t.index_select(0, used) for name, t in self.pool.slot_tensors.items()}
        self.codec.decode(records, {name: t[:count] for name, t in self.tensors.items()})
        scratch_ids = torch.searchsorted(used, slot_ids).to(slot_ids.dtype)
        self.pool.stats.record_decode(layer, count, time.perf_counter() - start)
        return scratch_ids, self.tensors
