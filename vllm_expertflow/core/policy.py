"""Eviction policies: which resident, unpinned slot gives up its expert for a new one.

Scores are pure functions of what a policy has seen (MoE-Infinity's split); the policy object
only keeps that state and picks the lowest score among the slots it may evict.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable

ExpertKey = tuple[int, int]  # (layer, expert)


class EvictionPolicy(ABC):
    """Sees every access to a slot; names a victim among the slots `is_evictable` allows."""

    @abstractmethod
    def record_access(self, slot: int, key: ExpertKey) -> None: ...

    @abstractmethod
    def forget(self, slot: int) -> None: ...

    @abstractmethod
    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int | None: ...


class LRUPolicy(EvictionPolicy):
    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def record_access(self, slot: int, key: ExpertKey) -> None:
        self._order[slot] = None
        self._order.move_to_end(slot)

    def forget(self, slot: int) -> None:
        self._order.pop(slot, None)

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int | None:
        return next((slot for slot in self._order if is_evictable(slot)), None)


class LFUPolicy(EvictionPolicy):
    """Evicts the expert used least often since the start; ties go to the least recent.

    Counts outlive eviction: an expert's popularity is a property of the model and the text,
    not of its current residency.
    """

    def __init__(self) -> None:
        self._counts: dict[ExpertKey, int] = {}
        self._recency = LRUPolicy()
        self._key_of: dict[int, ExpertKey] = {}

    def record_access(self, slot: int, key: ExpertKey) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1
        self._key_of[slot] = key
        self._recency.record_access(slot, key)

    def forget(self, slot: int) -> None:
        self._key_of.pop(slot, None)
        self._recency.forget(slot)

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int | None:
        candidates = [s for s in self._recency._order if is_evictable(s)]
        return min(candidates, key=lambda s: self._counts[self._key_of[s]], default=None)


class PredictivePolicy(EvictionPolicy):
    """Evicts the expert whose predicted next use is furthest away.

    The prefetcher feeds `predict(key, score)` with how soon each expert is expected (higher is
    sooner); experts with no prediction score 0 and go first, least recently used first.
    """

    def __init__(self) -> None:
        self._recency = LRUPolicy()
        self._key_of: dict[int, ExpertKey] = {}
        self._score: dict[ExpertKey, float] = {}

    def predict(self, key: ExpertKey, score: float) -> None:
        self._score[key] = score

    def clear_predictions(self, layer: int) -> None:
        """Predictions for a layer expire once that layer has run."""
        self._score = {k: v for k, v in self._score.items() if k[0] != layer}

    def record_access(self, slot: int, key: ExpertKey) -> None:
        self._key_of[slot] = key
        self._recency.record_access(slot, key)

    def forget(self, slot: int) -> None:
        self._key_of.pop(slot, None)
        self._recency.forget(slot)

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int | None:
        candidates = [s for s in self._recency._order if is_evictable(s)]
        return min(candidates, key=lambda s: self._score.get(self._key_of[s], 0.0), default=None)


POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "predictive": PredictivePolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; valid: {', '.join(POLICIES)}")
    return POLICIES[name]()
