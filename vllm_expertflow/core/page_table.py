"""Slot bookkeeping for the expert pool: which (layer, expert) lives in which slot, and pins.

Pure Python, like a block manager: no tensors here. The pool owns the tensors and asks this
table where things go.
"""

from __future__ import annotations

from collections import deque

from .policy import EvictionPolicy, ExpertKey


class PoolExhaustedError(RuntimeError):
    """Every slot is pinned by the running layer or by loads: nothing can be evicted."""


class PageTable:
    def __init__(self, num_slots: int, policy: EvictionPolicy) -> None:
        self.num_slots = num_slots
        self._policy = policy
        self._free: deque[int] = deque(range(num_slots))
        self._slot_of: dict[ExpertKey, int] = {}
        self._key_of: list[ExpertKey | None] = [None] * num_slots
        self._pins = [0] * num_slots
        self._per_layer: dict[int, int] = {}

    def lookup(self, key: ExpertKey) -> int | None:
        return self._slot_of.get(key)

    def key_in(self, slot: int) -> ExpertKey | None:
        return self._key_of[slot]

    def is_pinned(self, slot: int) -> bool:
        return self._pins[slot] > 0

    def allocate(self, key: ExpertKey, prefetch: bool = False) -> tuple[int, ExpertKey | None]:
        """Gives `key` a slot, evicting an unpinned expert if no slot is free.

        Returns the slot and the evicted key (None when a free slot was used). `prefetch`: the
        expert is loaded ahead of its use, not used now (the policy is told which).
        """
        assert key not in self._slot_of, f"{key} is already resident"
        evicted = None
        if self._free:
            slot = self._free.popleft()
        else:
            slot = self._policy.choose_victim(lambda s: not self.is_pinned(s), key)
            if slot is None:
                raise PoolExhaustedError(f"all {self.num_slots} expert slots are pinned")
            evicted = self._key_of[slot]
            del self._slot_of[evicted]
            self._per_layer[evicted[0]] -= 1
            self._policy.forget(slot)
        self._slot_of[key] = slot
        self._key_of[slot] = key
        self._per_layer[key[0]] = self._per_layer.get(key[0], 0) + 1
        if prefetch:
            self._policy.record_prefetch(slot, key)
        else:
            self._policy.record_access(slot, key)
        return slot, evicted

    def touch(self, slot: int) -> None:
        self._policy.record_access(slot, self._key_of[slot])

    def pin(self, slot: int) -> None:
        self._pins[slot] += 1

    def never_evict(self, slot: int) -> None:
        """Keeps a pinned slot's expert for good (a static hot set): no policy weighs it again."""
        assert self._pins[slot] > 0, f"slot {slot} is not pinned"
        self._policy.never_evict(slot)

    def unpin(self, slot: int) -> None:
        assert self._pins[slot] > 0, f"slot {slot} is not pinned"
        self._pins[slot] -= 1

    def num_resident_in(self, layer: int) -> int:
        return self._per_layer.get(layer, 0)

    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    def resident_keys(self) -> list[ExpertKey]:
        return list(self._slot_of)
