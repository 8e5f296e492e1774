"""Offline expert-cache simulation: replay a routing trace through the engine's own step.

By default batch-1 decode: every traced token is one forward that runs the MoE layers in order,
and layer L needs exactly the experts its router chose. `steps` groups trace rows into forwards
instead (a prefill, a batch of decodes), which the step splits into rounds as online. The replay
runs the online code: the step's host half (`moe_step.pinned_rounds`) on an `ExpertPool` that
keeps the books without moving data, the `Prefetcher` with its ranking and predictive-policy
weights, and the same eviction policies; only the kernel (which would compute nothing here) and
the link budget (free offline) differ. Rounds and predictions are planned for the whole trace
up front, so the loop is the page table's and the policy's work alone: about 5 us per (token,
layer) lookup for LRU on this machine (BENCHMARKS.md); tests/core/golden holds the counts it
must keep.

Modes:
  ondemand    no prediction; the policy alone decides what stays.
  prefetch    at layer L, the predictor's top-k experts for L+1..L+depth load into free or
              evictable slots (never the pinned ones of layer L), as the prefetcher does online.
  static      a fixed resident set (the most routed experts of a training trace) pinned for
              good; misses go through a scratch area of top_k slots.
  belady      offline optimal demand paging: evict the expert whose next use is furthest away.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from .moe_step import pinned_rounds
from .policy import EvictionPolicy, ExpertKey, make_policy
from .pool import ExpertPool
from .predictor import ExpertPredictor, trace_context, trace_layers
from .prefetcher import Prefetcher
from .stats import OffloadStats
from .step_plan import TokenGroup, group_tokens
from .store import RamStore
from .timeline import LayerStep

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
    # With `replay(..., timeline=True)`: each measured forward's layer-steps, for timeline.py.
    forwards: list[list[LayerStep]] = field(default_factory=list)

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
        del out["forwards"]  # not a count: the log
        return out


PREDICTIVE_POLICIES = ("gate", "transition", "learned")


def replay_spec(
    policy: str,
    predictor: ExpertPredictor | None = None,
    static_keys: list[ExpertKey] | None = None,
    prefetch_depth: int = 1,
) -> dict:
    """`replay` keyword arguments for a policy as `bench` and `plan` name it."""
    if policy == "lru-ondemand":
        return {"mode": "ondemand", "policy": "lru"}
    if policy == "belady":
        return {"mode": "belady"}
    if policy == "static":
        return {"mode": "static", "policy": "lru", "static_keys": static_keys}
    if policy in PREDICTIVE_POLICIES:
        return {
            "mode": "prefetch",
            "policy": "predictive",
            "predictor": predictor,
            "prefetch_depth": prefetch_depth,
        }
    raise ValueError(f"unknown policy {policy!r}")


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
    Of equally distant slots, the one holding its key longest goes. A heap of (next use, since
    when) finds the choice without scanning every slot; entries a later access or eviction
    outdated are dropped as they surface.
    """

    def __init__(self, accesses: dict[ExpertKey, list[int]]) -> None:
        self._times = accesses
        self._cursor: Counter[ExpertKey] = Counter()
        self._next_use: dict[int, float] = {}
        self._held_since: dict[int, int] = {}  # slot -> when it took its key, in accesses
        self._accesses = 0
        self._heap: list[tuple[float, int, int]] = []  # (-next use, held since, slot)

    def record_access(self, slot: int, key: ExpertKey) -> None:
        times = self._times[key]
        self._cursor[key] += 1
        cursor = self._cursor[key]
        next_use = times[cursor] if cursor < len(times) else math.inf
        self._accesses += 1
        self._held_since.setdefault(slot, self._accesses)
        self._next_use[slot] = next_use
        heapq.heappush(self._heap, (-next_use, self._held_since[slot], slot))
        if len(self._heap) > 4 * len(self._next_use) + 64:
            self._heap = [(-n, self._held_since[s], s) for s, n in self._next_use.items()]
            heapq.heapify(self._heap)

    def forget(self, slot: int) -> None:
        self._next_use.pop(slot, None)
        self._held_since.pop(slot, None)

    def choose_victim(self, is_evictable: Callable[[int], bool], incoming: ExpertKey) -> int | None:
        pinned, victim = [], None
        while self._heap and victim is None:
            entry = heapq.heappop(self._heap)
            negated_next_use, since, slot = entry
            if self._next_use.get(slot) != -negated_next_use or self._held_since[slot] != since:
                continue  # outdated
            if is_evictable(slot):
                victim = slot
            pinned.append(entry)  # kept: the caller may not evict it after all
        for entry in pinned:
            heapq.heappush(self._heap, entry)
        return victim


class _PrecomputedPredictor(ExpertPredictor):
    """Replays a predictor's answers, computed for the whole trace in large batches up front.

    Its ranking is the one the prefetcher makes of the predictor's own scores, with each row's
    predicted experts scored in the predictor's order; `rows` are the trace rows of the
    forward being replayed.
    """

    def __init__(self, layers: list[int], depth: int, num_experts: int, predicted: dict) -> None:
        super().__init__(layers, depth)
        self.num_experts = num_experts
        self.predicted = predicted
        self.rows: list[int] = []

    def scores(self, layer, depth, hidden, topk_ids, context=None) -> torch.Tensor:
        scores = torch.zeros(len(self.rows), self.num_experts)
        for i, row in enumerate(self.rows):
            experts = self.predicted[(layer, depth)][row]
            scores[i, experts] = torch.arange(len(experts), 0, -1, dtype=torch.float32)
        return scores

    def ranked(self, layer, depth, hidden, topk_ids, top_k, context=None):
        experts = self.predicted[(layer, depth)][self.rows[0]]
        if len(self.rows) == 1 and len(experts) == top_k:
            # One token's k distinct experts: each has every vote, in the predictor's order
            # (what `rank_for_batch` makes of these scores, without building them).
            return [(e, 1.0) for e in experts]
        return super().ranked(layer, depth, hidden, topk_ids, top_k, context)


def _zero_byte_pool(
    layers: list[int],
    num_experts: int,
    num_slots: int,
    eviction: EvictionPolicy,
    stats: OffloadStats,
) -> ExpertPool:
    """The engine's pool over experts of no bytes: the bookkeeping without the copies."""
    store = RamStore(num_experts, pin_memory=False)
    for layer in layers:
        store.write_layer(
            layer, {"w13": torch.empty(num_experts, 0), "w2": torch.empty(num_experts, 0)}
        )
    store.finish_writing()
    device = torch.device("cpu")
    return ExpertPool(
        store, num_slots, device, layers, eviction, stats, io_threads=0, moves_data=False
    )


class _TimelineLog(OffloadStats):
    """Counts as `OffloadStats` does, and keeps each layer-step's loads in issue order."""

    def __init__(self) -> None:
        super().__init__()
        self.forwards: list[list[LayerStep]] = []

    def begin(self, layer: int, tokens: int, new_forward: bool) -> None:
        if new_forward:
            self.forwards.append([])
        self.forwards[-1].append(LayerStep(layer, tokens))

    def record_lookups(self, layer: int, hits: int, misses: int) -> None:
        super().record_lookups(layer, hits, misses)
        if self.forwards:
            self.forwards[-1][-1].experts_run += hits + misses
            self.forwards[-1][-1].demand_loads += misses

    def record_prefetch(self, layer: int) -> None:
        super().record_prefetch(layer)
        if self.forwards:  # a static hot set's fill comes before any forward
            self.forwards[-1][-1].prefetch_targets.append(layer)


def _result(name: str, num_slots: int, stats: OffloadStats) -> ReplayResult:
    result = ReplayResult(name, num_slots)
    if isinstance(stats, _TimelineLog):
        result.forwards = stats.forwards
    for layer, s in stats.layers.items():
        result.per_layer[layer] = LayerCounts(s.lookups, s.hits, s.misses, s.prefetches_issued)
        result.lookups += s.lookups
        result.hits += s.hits
        result.demand_misses += s.misses
        result.prefetch_issued += s.prefetches_issued
        result.prefetch_used += s.prefetches_used
        result.prefetch_wasted += s.prefetches_wasted
    return result


def _routed_steps(
    manifest: dict, tensors: dict[str, torch.Tensor], steps: list[list[int]], capacity: int
) -> tuple[list[int], list[list[list[TokenGroup]]]]:
    """Layers, and per layer and forward the rounds the step will run (`group_tokens`), all
    planned up front; a round's experts are one `ensure_resident` call."""
    layers = trace_layers(manifest)
    routed = []
    for layer in layers:
        ids = tensors[f"topk_ids.{layer}"].tolist()
        routed.append([group_tokens([ids[row] for row in rows], capacity) for rows in steps])
    return layers, routed


def _access_times(
    layers: list[int], routed: list[list[list[TokenGroup]]]
) -> dict[ExpertKey, list[int]]:
    """Per key, the order of the rounds that use it (forward, then layer, then round)."""
    times: dict[ExpertKey, list[int]] = {}
    clock = 0
    for step in range(len(routed[0])):
        for li, layer in enumerate(layers):
            for _, experts in routed[li][step]:
                for e in experts:
                    times.setdefault((layer, e), []).append(clock)
                clock += 1
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
    steps: list[list[int]] | None = None,
    warm_steps: int = 0,
    timeline: bool = False,
    prefetches_per_layer: int | None = None,
) -> ReplayResult:
    """Replays the trace's forwards through the step and counts what the cache did.

    `steps`: the trace rows of each forward, in order (default: one row each, batch-1 decode);
    the first `warm_steps` forwards run but are not counted. `static_keys` (mode "static") are
    the resident set in order of preference; the first `num_slots - top_k` are kept. `policy`
    applies to "ondemand" and "prefetch" (and is the scratch policy of "static"). `timeline`:
    also keep every measured layer-step's loads in issue order (`ReplayResult.forwards`).
    `prefetches_per_layer`: the link budget the engine's prefetcher measures online (loads one
    layer's time can hide); default: no limit, as a free link allows.
    """
    new_stats = _TimelineLog if timeline else OffloadStats
    if mode not in MODES:
        raise ValueError(f"unknown replay mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "prefetch" and predictor is None:
        raise ValueError("prefetch replay needs a predictor")
    top_k = manifest["top_k"]
    if steps is None:
        num_rows = len(tensors[f"topk_ids.{trace_layers(manifest)[0]}"])
        steps = [[row] for row in range(num_rows)]
    static = (static_keys or [])[: num_slots - top_k] if mode == "static" else []
    layers, routed = _routed_steps(manifest, tensors, steps, num_slots - len(static))
    if mode == "belady":
        eviction: EvictionPolicy = BeladyPolicy(_access_times(layers, routed))
    else:
        eviction = make_policy(policy, num_slots, len(layers))
    pool = _zero_byte_pool(layers, manifest["num_experts"], num_slots, eviction, new_stats())
    pool.pin_permanently(static)
    prefetcher = None
    if mode == "prefetch":
        predicted = _predictions(predictor, manifest, tensors, prefetch_depth)
        depth = min(prefetch_depth, predictor.max_depth)
        recorded = _PrecomputedPredictor(layers, depth, manifest["num_experts"], predicted)
        budget = prefetches_per_layer or num_slots
        prefetcher = Prefetcher(pool, recorded, depth, top_k, loads_per_layer=budget)
    # The recorded predictor reads neither the hidden states nor the routing it is given.
    no_hidden, no_topk = torch.zeros(0, 1), torch.zeros(0, top_k, dtype=torch.long)
    for index in _progress(len(steps), f"replay {name or mode}", progress):
        if index == warm_steps:
            pool.stats = new_stats()  # what follows is what is measured
        if prefetcher is not None:
            recorded.rows = steps[index]
        for position, layer in enumerate(layers):
            if timeline:
                pool.stats.begin(layer, len(steps[index]), new_forward=position == 0)
            rounds = routed[position][index]
            for _ in pinned_rounds(pool, prefetcher, layer, rounds, no_hidden, no_topk):
                pass  # the kernel would run here, on the round's pinned slots
    pool.close()
    return _result(name or mode, num_slots, pool.stats)
