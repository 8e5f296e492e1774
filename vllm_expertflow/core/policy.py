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
    def choose_victim(
        self, is_evictable: Callable[[int], bool], incoming: ExpertKey
    ) -> int | None: ...


class _RecencyOrder(EvictionPolicy):
    """Slots from least to most recently used, with the key each holds.

    With a `layer_share`, a layer holding its share of slots replaces its own experts and a
    layer below it takes from layers above theirs. Without it, a pool shared by layers that run
    in a fixed cycle thrashes: the oldest expert is always the next layer's. Per-layer caches
    (mixtral-offloading's) avoid that by construction; the share keeps one pool while doing the
    same.
    """

    def __init__(self, layer_share: int | None = None) -> None:
        self.layer_share = layer_share
        self._order: OrderedDict[int, ExpertKey] = OrderedDict()

    def record_access(self, slot: int, key: ExpertKey) -> None:
        self._order[slot] = key
        self._order.move_to_end(slot)

    def forget(self, slot: int) -> None:
        self._order.pop(slot, None)

    def candidates(self, is_evictable: Callable[[int], bool], incoming: ExpertKey) -> list[int]:
        """Evictable slots, oldest first, narrowed to what the layer share allows."""
        evictable = [s for s in self._order if is_evictable(s)]
        if self.layer_share is None:
            return evictable
        per_layer: dict[int, int] = {}
        for layer, _ in self._order.values():
            per_layer[layer] = per_layer.get(layer, 0) + 1
        own = [s for s in evictable if self._order[s][0] == incoming[0]]
        # Layers that grew past their share (a wide batch) give slots back before a layer
        # still within its share loses any: otherwise the overflow evicts the layer run next.
        over = [
            s
            for s in evictable
            if self._order[s][0] != incoming[0] and per_layer[self._order[s][0]] > self.layer_share
        ]
        # Failing both, borrow from the layer that ran last: in the fixed cycle of layers it is
        # the one needed again furthest in the future.
        others = [s for s in evictable if self._order[s][0] != incoming[0]]
        last_layer = self._order[others[-1]][0] if others else None
        last_ran = [s for s in others if self._order[s][0] == last_layer]
        if per_layer.get(incoming[0], 0) >= self.layer_share:
            return own or over or last_ran or evictable
        return over or last_ran or evictable


class LRUPolicy(_RecencyOrder):
    def choose_victim(self, is_evictable: Callable[[int], bool], incoming: ExpertKey) -> int | None:
        return next(iter(self.candidates(is_evictable, incoming)), None)


class LFUPolicy(_RecencyOrder):
    """Evicts the expert used least often since the start; ties go to the least recent.

    Counts outlive eviction: an expert's popularity is a property of the model and the text,
    not of its current residency.
    """

    def __init__(self, layer_share: int | None = None) -> None:
        super().__init__(layer_share)
        self._counts: dict[ExpertKey, int] = {}

    def record_access(self, slot: int, key: ExpertKey) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1
        super().record_access(slot, key)

    def choose_victim(self, is_evictable: Callable[[int], bool], incoming: ExpertKey) -> int | None:
        candidates = self.candidates(is_evictable, incoming)
        return min(candidates, key=lambda s: self._counts[self._order[s]], default=None)


class PredictivePolicy(_RecencyOrder):
    """Evicts the expert whose predicted next use is furthest away.

    The prefetcher feeds `predict(key, score)` with how soon each expert is expected (higher is
    sooner); experts with no prediction score 0 and go first, least recently used first.
    """

    def __init__(self, layer_share: int | None = None) -> None:
        # Predictions already say which layer needs what next: no share is imposed.
        super().__init__(layer_share=None)
        self._score: dict[ExpertKey, float] = {}

    def predict(self, key: ExpertKey, score: float) -> None:
        self._score[key] = score

    def clear_predictions(self, layer: int) -> None:
        """Predictions for a layer expire once that layer has run."""
        self._score = {k: v for k, v in self._score.items() if k[0] != layer}

    def choose_victim(self, is_evictable: Callable[[int], bool], incoming: ExpertKey) -> int | None:
        candidates = self.candidates(is_evictable, incoming)
        return min(candidates, key=lambda s: self._score.get(self._order[s], 0.0), default=None)


POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "predictive": PredictivePolicy,
    # A hot set pinned for good (kTransformers / llama.cpp placement); the rest of the pool
    # is an LRU scratch area for misses.
    "static": LRUPolicy,
}


def make_policy(name: str, num_slots: int, num_layers: int) -> EvictionPolicy:
    """A policy for a pool of `num_slots` shared by `num_layers` MoE layers."""
    layer_share = None if name == "static" else max(1, num_slots // num_layers)
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; valid: {', '.join(POLICIES)}")
    return POLICIES[name](layer_share)
