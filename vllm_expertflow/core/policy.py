"""Eviction policies: which resident, unpinned slot gives up its expert for a new one.

Scores are pure functions of what a policy has seen (MoE-Infinity's split); the policy object
only keeps that state and picks the lowest score among the slots it may evict.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

ExpertKey = tuple[int, int]  # (layer, expert)


class EvictionPolicy(ABC):
    """Sees every access to a slot; names a victim among the slots `is_evictable` allows."""

    @abstractmethod
    def record_access(self, slot: int, key: ExpertKey) -> None: ...

    def record_prefetch(self, slot: int, key: ExpertKey) -> None:
        """`key` was loaded into `slot` ahead of its use; by default, like a use."""
        self.record_access(slot, key)

    @abstractmethod
    def forget(self, slot: int) -> None: ...

    def never_evict(self, slot: int) -> None:
        """`slot` is pinned for good (a static hot set): it need never be a candidate again."""

    def prepare(self) -> None:
        """Loads now what a first choice would load (the engine calls it once its pool is
        built), so no eviction while serving pays for it."""

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

    The order is kept whole and split by layer, with each slot's place in the whole (a stamp),
    so a choice looks at the few layers the share allows instead of every slot (0.5 ms a miss
    at 1,536 slots). Slots pinned for good (a static hot set) count towards their layer's
    share but leave the orders: no choice has to step over them.
    """

    def __init__(self, layer_share: int | None = None) -> None:
        self.layer_share = layer_share
        self._order: OrderedDict[int, ExpertKey] = OrderedDict()
        self._by_layer: dict[int, OrderedDict[int, None]] = {}
        self._stamp: dict[int, int] = {}
        self._clock = 0
        self._layer_size: dict[int, int] = {}  # slots per layer, pinned for good or not
        self._pinned_for_good: dict[int, ExpertKey] = {}

    def never_evict(self, slot: int) -> None:
        key = self._order.pop(slot)
        del self._by_layer[key[0]][slot]
        self._pinned_for_good[slot] = key

    def record_access(self, slot: int, key: ExpertKey) -> None:
        self._clock += 1
        if slot in self._pinned_for_good:
            return
        held = self._order.get(slot)
        if held is None:
            self._layer_size[key[0]] = self._layer_size.get(key[0], 0) + 1
        elif held[0] != key[0]:
            del self._by_layer[held[0]][slot]
            self._layer_size[held[0]] -= 1
            self._layer_size[key[0]] = self._layer_size.get(key[0], 0) + 1
        self._order[slot] = key
        self._order.move_to_end(slot)
        layer_order = self._by_layer.setdefault(key[0], OrderedDict())
        layer_order[slot] = None
        layer_order.move_to_end(slot)
        self._stamp[slot] = self._clock

    def forget(self, slot: int) -> None:
        key = self._order.pop(slot, None)
        if key is not None:
            del self._by_layer[key[0]][slot]
            del self._stamp[slot]
            self._layer_size[key[0]] -= 1

    def _first(self, layer: int, is_evictable: Callable[[int], bool], newest: bool = False):
        """The layer's least (or most) recently used evictable slot, or None."""
        slots = self._by_layer.get(layer, {})
        return next((s for s in (reversed(slots) if newest else slots) if is_evictable(s)), None)

    def victim_layers(
        self, is_evictable: Callable[[int], bool], incoming: ExpertKey
    ) -> list[int] | None:
        """The layers the victim may come from under the layer share (None: any layer).

        A layer at its share gives up its own; else layers past their share give back; else
        the layer that ran last (in the fixed cycle of layers, the one needed again furthest
        in the future) lends; else the incoming layer's own.
        """
        if self.layer_share is None:
            return None
        own = incoming[0]
        if self._layer_size.get(own, 0) >= self.layer_share:
            if self._first(own, is_evictable) is not None:
                return [own]
        others = [layer for layer, slots in self._by_layer.items() if layer != own and slots]
        over = [
            layer
            for layer in others
            if self._layer_size[layer] > self.layer_share
            and self._first(layer, is_evictable) is not None
        ]
        if over:
            return over
        newest = [
            s for s in (self._first(lr, is_evictable, True) for lr in others) if s is not None
        ]
        if newest:
            return [self._order[max(newest, key=self._stamp.__getitem__)][0]]
        return [own]


class LRUPolicy(_RecencyOrder):
    def choose_victim(self, is_evictable: Callable[[int], bool], incoming: ExpertKey) -> int | None:
        """The least recently used slot of the layers the share allows."""
        layers = self.victim_layers(is_evictable, incoming)
        if layers is None:
            return next((s for s in self._order if is_evictable(s)), None)
        oldest = [
            s for s in (self._first(layer, is_evictable) for layer in layers) if s is not None
        ]
        return min(oldest, key=self._stamp.__getitem__, default=None)


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
        layers = self.victim_layers(is_evictable, incoming)
        groups = [self._order] if layers is None else [self._by_layer.get(lr, {}) for lr in layers]
        candidates = (s for group in groups for s in group if is_evictable(s))
        return min(
            candidates, key=lambda s: (self._counts[self._order[s]], self._stamp[s]), default=None
        )


HALF_LIFE = 16.0  # turns of its layer until an expert's use count halves
DECAY_PER_TURN = 1.0 - 0.5 ** (1.0 / HALF_LIFE)  # a rate of 1 use per turn, as a count


class PredictivePolicy(EvictionPolicy):
    """Evicts the expert expected to be needed again furthest in the future: Belady's rule with
    the future estimated, by the predictor where it looks and by recent frequency elsewhere.

    MoE layers run in a fixed cycle of L turns. An expert of the layer whose turn is d steps
    away is needed at that turn with probability s, else at a later turn of its layer, each
    with probability p: expected wait d + (1 - s) * L / p. p is how often it was routed at its
    layer's recent turns (a count that halves every `HALF_LIFE` turns); s is the predictor's
    share of tokens routed to it at that turn when the prefetcher has scored it, else p. Ties
    go to the least recently used.

    Replaying 2,000 tokens of the demo's held-out trace (learned predictor, depth 2, pools of
    12.5-50%), this made 3-6% fewer loads and 2-7% fewer demand misses than evicting by
    prediction score, then LRU. Without predictions (frequency and cycle only) it did no
    better than LRU: history alone does not say what comes next.
    """

    def __init__(self) -> None:
        # No layer share: the cycle distance already says which layer needs its experts next.
        self._layers: list[int] = []  # in run order, learned as each first runs
        self._place: dict[int, int] = {}  # layer -> its place in `_layers`
        self._current: int | None = None
        self._uses: dict[ExpertKey, tuple[float, int]] = {}  # decayed count, turn last updated
        self._share: dict[ExpertKey, float] = {}
        self._key_of: dict[int, ExpertKey] = {}  # slot -> key, for the slots it may evict
        self._slot_of: dict[ExpertKey, int] = {}
        self._pinned_for_good: set[int] = set()
        self._clock = 0
        # What a choice scores, per slot, as arrays a compiled loop reads.
        self._resident = np.zeros(0, dtype=bool)
        self._counts = np.zeros(0)
        self._lasts = np.zeros(0, dtype=np.int64)
        self._layer_of = np.zeros(0, dtype=np.int64)
        self._shares = np.zeros(0)  # NaN: no prediction
        self._stamps = np.zeros(0, dtype=np.int64)  # when last held: ties go to the oldest
        # Per layer id: its turns so far, and (per place of the layer running now) the turns
        # until each layer runs next, a full cycle for the one running.
        self._turn_of = np.zeros(0, dtype=np.int64)
        self._distances: dict[int, np.ndarray] = {}
        # 0.5 ** (age / HALF_LIFE) by age in turns, as `_decayed` computes it.
        self._decay = np.ones(1)

    def predict(self, key: ExpertKey, share: float) -> None:
        """`share`: the predicted share of tokens routed to `key` at its layer's next turn."""
        self._share[key] = share
        if key in self._slot_of:
            self._shares[self._slot_of[key]] = share

    def prepare(self) -> None:
        # The compiled scoring loads at a first choice (numba and its cached machine code:
        # 0.33 s on this machine); a throwaway policy makes one, with the arrays' own types.
        scratch = PredictivePolicy()
        scratch.record_access(0, (0, 0))
        scratch.choose_victim(lambda slot: True, (0, 1))

    def clear_predictions(self, layer: int) -> None:
        """Predictions for a layer expire once that layer has run."""
        self._share = {k: v for k, v in self._share.items() if k[0] != layer}
        self._shares[self._layer_of == layer] = np.nan

    def never_evict(self, slot: int) -> None:
        del self._key_of[slot]
        self._pinned_for_good.add(slot)
        self._resident[slot] = False  # scored no more

    def forget(self, slot: int) -> None:
        key = self._key_of.pop(slot, None)
        if key is not None:
            del self._slot_of[key]
            self._resident[slot] = False

    def record_access(self, slot: int, key: ExpertKey) -> None:
        layer = key[0]
        if layer != self._current:  # a new turn of `layer`
            self._know(layer)
            self._turn_of[layer] += 1
            self._current = layer
        turn = int(self._turn_of[layer])
        count, last = self._uses.get(key, (0.0, 0))
        if last != turn:  # once per turn, whatever the rounds
            self._uses[key] = (self._decayed(count, last, turn) + 1.0, turn)
        self._hold(slot, key)

    def record_prefetch(self, slot: int, key: ExpertKey) -> None:
        # Recent, but not a use: the turn and frequency are the router's, not the predictor's.
        self._know(key[0])
        self._hold(slot, key)

    def _hold(self, slot: int, key: ExpertKey) -> None:
        """`slot` holds `key`, just used: the slot's scoring inputs."""
        self._clock += 1
        if slot >= len(self._resident):
            for name in ("_resident", "_counts", "_lasts", "_layer_of", "_shares", "_stamps"):
                setattr(self, name, self._grown(getattr(self, name), slot))
        evictable = slot not in self._pinned_for_good
        if evictable:
            held = self._key_of.get(slot)
            if held is not None and held != key:
                del self._slot_of[held]
            self._key_of[slot] = key
            self._stamps[slot] = self._clock
        count, last = self._uses.get(key, (0.0, 0))
        self._slot_of[key] = slot
        self._resident[slot] = evictable
        self._counts[slot], self._lasts[slot], self._layer_of[slot] = count, last, key[0]
        self._shares[slot] = self._share.get(key, np.nan)

    @staticmethod
    def _grown(array: np.ndarray, index: int) -> np.ndarray:
        if index < len(array):
            return array
        size = max(index + 1, 2 * len(array))
        return np.concatenate([array, np.zeros(size - len(array), array.dtype)])

    def _know(self, layer: int) -> None:
        if layer not in self._place:
            self._layers = sorted([*self._layers, layer])
            self._place = {known: place for place, known in enumerate(self._layers)}
            self._turn_of = self._grown(self._turn_of, layer)
            self._distances = {}

    def expected_wait(self, key: ExpertKey) -> float:
        """Layer turns until `key` is expected to be needed again."""
        layer = key[0]
        count, last = self._uses.get(key, (0.0, 0))
        decayed = self._decayed(count, last, int(self._turn_of[layer]))
        distance = self._distances_now()[layer]
        from . import wait_scoring  # late: see its docstring

        return wait_scoring.expected_wait(
            decayed, self._share.get(key, np.nan), distance, len(self._layers)
        )

    def choose_victim(self, is_evictable: Callable[[int], bool], incoming: ExpertKey) -> int | None:
        """The evictable slot with the longest `expected_wait`, the least recently used of
        equals: the same arithmetic on every resident slot, compiled (a choice is on the path
        of every miss; as about 20 array operations it took 35 us at any pool size)."""
        from . import wait_scoring  # late: see its docstring

        distance_of = self._distances_now()
        scored = self._resident
        ranked = np.empty(4, dtype=np.int64)  # most choices take the first or second
        while True:
            oldest = wait_scoring.longest_waits(
                scored, self._counts, self._lasts, self._layer_of, self._shares, self._stamps,
                self._turn_of, distance_of, self._decay, len(self._layers), ranked,
            )  # fmt: skip
            if oldest >= 0:  # the decay table is too short: extend it and score again
                more = [0.5 ** (age / HALF_LIFE) for age in range(len(self._decay), oldest + 1)]
                self._decay = np.concatenate([self._decay, more])
                continue
            for slot in ranked.tolist():
                if slot < 0:
                    return None
                if is_evictable(slot):
                    return slot
            # All pinned for this step: the next longest waits.
            scored = scored.copy() if scored is self._resident else scored
            scored[ranked] = False

    def _distances_now(self) -> np.ndarray:
        """Per layer id, the turns until it runs next, counted from the layer running now."""
        current = self._place[self._current] if self._current is not None else -1
        distances = self._distances.get(current)
        if distances is None:
            num_layers = len(self._layers)
            distances = np.zeros(len(self._turn_of))
            for place, layer in enumerate(self._layers):
                distances[layer] = (place - current) % num_layers or num_layers
            self._distances[current] = distances
        return distances

    def _decayed(self, count: float, last: int, turn: int) -> float:
        return count * 0.5 ** ((turn - last) / HALF_LIFE)


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
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; valid: {', '.join(POLICIES)}")
    if name == "predictive":
        return PredictivePolicy()
    return POLICIES[name](None if name == "static" else max(1, num_slots // num_layers))
