"""Offline expert-cache simulation: replay a routing trace through the real page table.

Batch-1 decode: every traced token is one step that runs the MoE layers in order, and layer L
needs exactly the experts its router chose. All layers share `num_slots` slots, as in the
online pool: a layer pins its experts (hits first, then misses loaded on demand), may prefetch
the experts a predictor expects for the next layers, and releases its pins.

Modes:
  ondemand    no prediction; the policy alone decides what stays.
  prefetch    at layer L, load the predictor's top-k experts for L+1..L+depth into free or
              evictable slots (never the pinned ones of layer L).
  static      a fixed resident set (the most routed experts of a training trace) pinned for
              good; misses go through a scratch area of top_k slots.
  belady      offline optimal demand paging: evict the expert whose next use is furthest away.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from .page_table import PageTable, PoolExhaustedError
from .policy import EvictionPolicy, ExpertKey, PredictivePolicy, make_policy
from .predictor import ExpertPredictor, trace_context, trace_layers

MODES = ("ondemand", "prefetch", "static", "belady")


@dataclass
class LayerCounts:
    lookups: int = 0
    hits: int = 0
    demand_misses: int = 0
    prefetches: int = 0


@dataclass
class ReplayResult:
    name: str
    num_slots: int
    lookups: int = 0
    hits: int = 0
    demand_misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    per_layer: dict[int, LayerCounts] = field(default_factory=dict)

    @property
    def loads(self) -> int:
        return self.demand_misses + self.prefetch_issued

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else float("nan")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["loads"] = self.loads
        out["hit_rate"] = self.hit_rate
        out["per_layer"] = {str(k): asdict(v) for k, v in self.per_layer.items()}
        return out


def slots_for_fraction(fraction: float, num_layers: int, num_experts: int) -> int:
    return math.ceil(fraction * num_layers * num_experts)


def most_routed_experts(
    manifest: dict, tensors: dict[str, torch.Tensor], count: int
) -> list[ExpertKey]:
    """The `count` (layer, expert) pairs routed most often in a trace, most routed first."""
    counts: Counter[ExpertKey] = Counter()
    for layer in trace_layers(manifest):
        ids, freq = tensors[f"topk_ids.{layer}"].long().flatten().unique(return_counts=True)
        counts.update({(layer, e): n for e, n in zip(ids.tolist(), freq.tolist(), strict=True)})
    return [key for key, _ in counts.most_common(count)]


class BeladyPolicy(EvictionPolicy):
    """Knows the whole future access sequence; evicts the key used again furthest ahead.

    Every access to a key in the replay is exactly one `record_access` (a hit's touch or a
    miss's allocate), so a per-key cursor into its access times tracks "now" without a clock.
    """

    def __init__(self, accesses: dict[ExpertKey, list[int]]) -> None:
        self._times = accesses
        self._cursor: Counter[ExpertKey] = Counter()
        self._next_use: dict[int, float] = {}

    def record_access(self, slot: int, key: ExpertKey) -> None:
        times = self._times[key]
        self._cursor[key] += 1
        cursor = self._cursor[key]
        self._next_use[slot] = times[cursor] if cursor < len(times) else math.inf

    def forget(self, slot: int) -> None:
        self._next_use.pop(slot, None)

    def choose_victim(self, is_evictable: Callable[[int], bool], incoming: ExpertKey) -> int | None:
        candidates = [s for s in self._next_use if is_evictable(s)]
        return max(candidates, key=self._next_use.__getitem__, default=None)


class _Cache:
    """The page table plus the counters of one replay; owns pinning and prefetch bookkeeping."""

    def __init__(self, table: PageTable, result: ReplayResult) -> None:
        self.table = table
        self.result = result
        self._unused_prefetches: set[ExpertKey] = set()

    def _layer(self, layer: int) -> LayerCounts:
        return self.result.per_layer.setdefault(layer, LayerCounts())

    def _place(self, key: ExpertKey) -> int:
        slot, evicted = self.table.allocate(key)
        if evicted in self._unused_prefetches:
            self._unused_prefetches.discard(evicted)
            self.result.prefetch_wasted += 1
        return slot

    def access(self, layer: int, experts: list[int]) -> list[int]:
        """Pins the layer's experts, hits first so a miss never evicts one this layer needs."""
        counts, result = self._layer(layer), self.result
        keys = [(layer, e) for e in experts]
        slots = [self.table.lookup(key) for key in keys]
        for key, slot in zip(keys, slots, strict=True):
            if slot is not None:
                self.table.pin(slot)
                self.table.touch(slot)
                if key in self._unused_prefetches:
                    self._unused_prefetches.discard(key)
                    result.prefetch_used += 1
        misses = [i for i, slot in enumerate(slots) if slot is None]
        for i in misses:
            slots[i] = self._place(keys[i])
            self.table.pin(slots[i])
        hits = len(keys) - len(misses)
        counts.lookups += len(keys)
        counts.hits += hits
        counts.demand_misses += len(misses)
        result.lookups += len(keys)
        result.hits += hits
        result.demand_misses += len(misses)
        return slots  # type: ignore[return-value]

    def prefetch(self, keys: list[ExpertKey]) -> None:
        """Loads `keys` in order of preference while a slot is free or evictable.

        Each wanted key is pinned for the round so a later, less wanted prefetch cannot evict
        it; the first key with no slot left ends the round.
        """
        pinned = []
        for key in keys:
            slot = self.table.lookup(key)
            if slot is None:
                try:
                    slot = self._place(key)
                except PoolExhaustedError:
                    break
                self._unused_prefetches.add(key)
                self.result.prefetch_issued += 1
                self._layer(key[0]).prefetches += 1
            self.table.pin(slot)
            pinned.append(slot)
        self.release(pinned)

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.table.unpin(slot)


def _trace_steps(
    manifest: dict, tensors: dict[str, torch.Tensor]
) -> tuple[list[int], list[list[list[int]]]]:
    """Layers, and per layer the experts of every token as Python lists (fast to iterate)."""
    layers = trace_layers(manifest)
    routed = [
        [list(dict.fromkeys(row)) for row in tensors[f"topk_ids.{layer}"].tolist()]
        for layer in layers
    ]
    return layers, routed


def _access_times(layers: list[int], routed: list[list[list[int]]]) -> dict[ExpertKey, list[int]]:
    """Per key, the steps (token * layers + layer index) that use it, in order."""
    times: dict[ExpertKey, list[int]] = {}
    num_layers = len(layers)
    for li, layer in enumerate(layers):
        for token, experts in enumerate(routed[li]):
            for e in experts:
                times.setdefault((layer, e), []).append(token * num_layers + li)
    for steps in times.values():
        steps.sort()
    return times


def _predictions(
    predictor: ExpertPredictor,
    manifest: dict,
    tensors: dict[str, torch.Tensor],
    depth: int,
    chunk: int = 8192,
) -> dict[tuple[int, int], list[list[int]]]:
    """Per (layer, depth), every token's top-k predicted experts of the target layer."""
    k = manifest["top_k"]
    out = {}
    for layer in trace_layers(manifest):
        hidden, topk = tensors[f"hidden.{layer}"], tensors[f"topk_ids.{layer}"].long()
        context = trace_context(tensors, layer) if predictor.context_inputs else {}
        for d in range(1, depth + 1):
            if predictor.target_layer(layer, d) is None:
                continue
            rows = [
                predictor.predict_experts(
                    layer,
                    d,
                    hidden[i : i + chunk].float(),
                    topk[i : i + chunk],
                    k,
                    {name: c[i : i + chunk] for name, c in context.items()},
                )
                for i in range(0, len(hidden), chunk)
            ]
            out[(layer, d)] = torch.cat(rows).tolist()
    return out


def _progress(total: int, desc: str, enabled: bool) -> Iterator[int]:
    from tqdm import tqdm

    return iter(tqdm(range(total), desc=desc, disable=not enabled, mininterval=1.0))


def replay(
    manifest: dict,
    tensors: dict[str, torch.Tensor],
    num_slots: int,
    mode: str = "ondemand",
    policy: str = "lru",
    predictor: ExpertPredictor | None = None,
    prefetch_depth: int = 1,
    static_keys: list[ExpertKey] | None = None,
    name: str | None = None,
    progress: bool = False,
) -> ReplayResult:
    """Replays every token of the trace, batch-1 decode style, and counts what the cache did.

    `static_keys` (mode "static") are the resident set in order of preference; the first
    `num_slots - top_k` are kept. `policy` applies to "ondemand" and "prefetch" (and is the
    scratch policy of "static").
    """
    if mode not in MODES:
        raise ValueError(f"unknown replay mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "prefetch" and predictor is None:
        raise ValueError("prefetch replay needs a predictor")
    layers, routed = _trace_steps(manifest, tensors)
    if mode == "belady":
        eviction: EvictionPolicy = BeladyPolicy(_access_times(layers, routed))
    else:
        eviction = make_policy(policy, num_slots, len(layers))
    result = ReplayResult(name or mode, num_slots)
    cache = _Cache(PageTable(num_slots, eviction), result)
    if mode == "static":
        _pin_for_good(cache, (static_keys or [])[: num_slots - manifest["top_k"]])
    predicted = (
        _predictions(predictor, manifest, tensors, prefetch_depth) if mode == "prefetch" else {}
    )
    predictive = eviction if isinstance(eviction, PredictivePolicy) else None
    for token in _progress(len(routed[0]), f"replay {result.name}", progress):
        for li, layer in enumerate(layers):
            slots = cache.access(layer, routed[li][token])
            if predictive is not None:
                predictive.clear_predictions(layer)
            if predicted:
                cache.prefetch(_wanted(layers, li, token, prefetch_depth, predicted, predictive))
            cache.release(slots)
    return result


def _wanted(
    layers: list[int],
    li: int,
    token: int,
    depth: int,
    predicted: dict[tuple[int, int], list[list[int]]],
    predictive: PredictivePolicy | None,
) -> list[ExpertKey]:
    """The experts to prefetch at layer `layers[li]`, nearest layer first.

    A predictive policy also learns how soon each is needed, so eviction keeps the nearer ones.
    """
    keys = []
    for d in range(1, depth + 1):
        experts = predicted.get((layers[li], d))
        if experts is None:
            break
        for e in experts[token]:
            key = (layers[li + d], e)
            keys.append(key)
            if predictive is not None:
                predictive.predict(key, float(depth + 1 - d))
    return keys


def _pin_for_good(cache: _Cache, keys: list[ExpertKey]) -> None:
    for key in keys:
        slot, _ = cache.table.allocate(key)
        cache.table.pin(slot)


def misses_relative(results: list[ReplayResult], reference: ReplayResult) -> dict[str, float]:
    """Each run's demand misses as a multiple of the reference run's (Belady's)."""
    base = max(reference.demand_misses, 1)
    return {r.name: r.demand_misses / base for r in results}
