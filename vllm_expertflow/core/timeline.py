"""Decode time of an offloaded MoE on given hardware, from the loads a replay issued.

The replay (replay.py) runs the engine's own step, pool and prefetcher over a routing trace and
logs, in the order the pool issued them, each layer-step's lookups and demand misses and each
prefetch with its target layer. This module puts that log on a clock, one forward at a time:

    layer start ──► demand loads queue on the link ──► compute starts when they and every
                    prefetch of this layer have landed ──► compute ends ──► next layer
    prefetches issued at a layer enter the link queue when that layer's compute starts (or,
    for predictors that read the layer's output, when it ends)

The `Link` is how the pool moves experts. On a GPU, one copy stream: prefetches and demand
loads in one FIFO queue, in issue order. On the CPU, the pool's I/O threads serve prefetches in
order while a layer's demand misses load on their own readers, a few at once, never behind a
prefetch; the loads at the queues' heads share one store, whose time per load depends on how
many are in flight (`Link.in_flight_seconds`, measured on the store). A GPU's copy engines
are independent queues (`Link.independent`): a load occupies one for bytes / bandwidth +
latency / io_queues. Compute per layer-step is memory-bound decode: the layer's resident
bytes it reads (attention, dense or shared MLP, every distinct expert it runs) over device
bandwidth, or its FLOPs over the FLOP rate, whichever is longer, plus a fixed overhead per
layer. A stall is the time a layer waits for the link. Attention over the KV cache is left
out (short contexts).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Hardware:
    """What the plan needs to know about a machine; bandwidths in GB/s (1e9 bytes)."""

    name: str
    link_gbps: float  # host (or disk) to device, achievable
    link_latency_us: float  # per transfer
    io_queues: int  # transfers in flight (copy engines, I/O queue depth)
    memory_gbps: float  # device memory bandwidth, achievable
    tflops: float  # dense bf16 matmul rate, achievable
    memory_gib: float  # device memory for weights, KV cache and the pool
    layer_overhead_us: float = 0.0  # per layer-step: kernel launches, the step's bookkeeping
    source: str = ""

    def load_seconds(self, num_bytes: int) -> float:
        return num_bytes / (self.link_gbps * 1e9) + self.link_latency_us * 1e-6 / self.io_queues


@dataclass(frozen=True)
class Link:
    """The pool's loads as the clock sees them. `in_flight_seconds`: wall seconds per load,
    amortized, with 1, 2, ... loads in flight on the link (the last holds for more).
    `prefetch_queues` background loads in flight; `demand_readers` None: demand loads join
    the same queues in issue order (one CUDA copy stream), else a layer's demand misses load
    that many at a time on readers of their own (the CPU pool's calling thread and demand
    readers)."""

    in_flight_seconds: tuple[float, ...]
    prefetch_queues: int = 1
    demand_readers: int | None = None

    @classmethod
    def independent(
        cls, load_seconds: float, prefetch_queues: int = 1, demand_readers: int | None = None
    ) -> Link:
        """Queues that each move a load in `load_seconds` whatever the others do (copy
        engines, I/O queues of a device that is not the bottleneck)."""
        queues = prefetch_queues + (demand_readers or 0)
        per_load = tuple(load_seconds / k for k in range(1, queues + 1))
        return cls(per_load, prefetch_queues, demand_readers)

    def seconds_per_load(self, in_flight: int) -> float:
        """Wall seconds per load, amortized, while `in_flight` loads share the link."""
        return self.in_flight_seconds[min(in_flight, len(self.in_flight_seconds)) - 1]


class _LinkClock:
    """The link's queues on a clock. Each queue serves its loads in order; the loads at the
    queues' heads move together, each at 1 / (k x `seconds_per_load(k)`) loads per second
    while k are in flight. A load is a [work left, tag] pair; `pending` counts loads by tag."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.now = 0.0
        self.queues: list[deque[list]] = [
            deque() for _ in range(link.prefetch_queues + (link.demand_readers or 0))
        ]
        self.pending: Counter = Counter()

    @property
    def num_pending(self) -> int:
        return sum(self.pending.values())

    def add(self, queue: int, tag: object) -> None:
        self.queues[queue].append([1.0, tag])
        self.pending[tag] += 1

    def least_busy(self, queues: range) -> int:
        return min(queues, key=lambda q: sum(work for work, _ in self.queues[q]))

    def advance(self, until: float) -> None:
        """Moves the loads on until `until` (landing those that finish by then)."""
        while self._next_landing(until):
            pass
        self.now = max(self.now, until)

    def wait_for(self, tags: tuple[object, ...]) -> float:
        """Moves the loads on until none tagged `tags` is left; returns that time."""
        while any(self.pending[tag] for tag in tags):
            landed = self._next_landing(float("inf"))
            assert landed, "waiting for loads no queue holds"
        return self.now

    def _next_landing(self, until: float) -> bool:
        """Moves on to the next landing if it comes by `until`; False if none does."""
        heads = [queue[0] for queue in self.queues if queue]
        if not heads:
            return False
        rate = 1.0 / (len(heads) * self.link.seconds_per_load(len(heads)))
        least = min(work for work, _ in heads)
        step = least / rate
        if self.now + step > until:
            for head in heads:
                head[0] -= (until - self.now) * rate
            return False
        self.now += step
        for queue in self.queues:
            if queue:
                queue[0][0] -= least
                if queue[0][0] <= 1e-12:
                    self.pending[queue.popleft()[1]] -= 1
        return True


@dataclass(frozen=True)
class LayerCost:
    """What one MoE layer-step reads and computes, for a batch of `tokens`."""

    resident_bytes: int  # attention, the dense or shared MLP: read on every step
    expert_bytes: int  # one routed expert
    flops_per_token: float  # attention and MLP matmuls of one token (2 x active parameters)


@dataclass
class LayerStep:
    """One layer of one forward, as the replay's pool saw it."""

    layer: int
    tokens: int
    experts_run: int = 0  # distinct experts the layer computed (lookups)
    demand_loads: int = 0
    prefetch_targets: list[int] = field(default_factory=list)  # one entry per prefetch


@dataclass
class TimelineResult:
    seconds: float = 0.0
    stall_seconds: float = 0.0
    compute_seconds: float = 0.0
    loads: int = 0
    tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    @property
    def stall_share(self) -> float:
        return self.stall_seconds / self.seconds if self.seconds else 0.0


def compute_seconds(cost: LayerCost, hardware: Hardware, tokens: int, experts_run: int) -> float:
    read = cost.resident_bytes + experts_run * cost.expert_bytes
    memory = read / (hardware.memory_gbps * 1e9)
    arithmetic = tokens * cost.flops_per_token / (hardware.tflops * 1e12)
    return max(memory, arithmetic) + hardware.layer_overhead_us * 1e-6


def simulate(
    forwards: list[list[LayerStep]],
    compute: Callable[[LayerStep], float] | float,
    link: Link,
    extra_seconds_per_forward: float = 0.0,
    prefetch_after_compute: bool = False,
    lead_seconds: float = 0.0,
    prefetch_budget: int | None = None,
) -> TimelineResult:
    """Puts the replay's forwards on one clock: `compute` gives a layer-step's compute time
    (from hardware figures with `compute_seconds`), or is one measured time for every
    layer-step; `extra_seconds_per_forward` (the non-MoE rest: embeddings, head) is added to
    each forward's compute. `prefetch_after_compute`: a layer's prefetches are issued when it
    has computed (predictors that read its output), not when it starts. `lead_seconds`: the
    part of each layer before its MoE step (attention): loads in flight go on landing during
    it, and a layer only waits, and issues its demand loads, once it has run.
    `prefetch_budget`: the prefetches a layer may issue less those still in flight, as the
    online prefetcher counts (None: all it logged); one over it is not issued, so its target
    layer loads that expert on demand instead (the replay, with no clock, cannot know)."""
    result = TimelineResult()
    clock = 0.0
    links = _LinkClock(link)
    prefetch_queues = range(link.prefetch_queues)
    demand = "demand"
    not_issued: Counter = Counter()  # target layer -> prefetches the budget left out
    for forward in forwards:
        result.tokens += forward[0].tokens if forward else 0
        for step in forward:
            start = clock + lead_seconds
            links.advance(start)
            demand_loads = step.demand_loads + not_issued.pop(step.layer, 0)
            for i in range(demand_loads):  # dealt out in turn, as the pool does
                if link.demand_readers is None:
                    links.add(links.least_busy(prefetch_queues), demand)
                else:
                    links.add(link.prefetch_queues + i % link.demand_readers, demand)
            compute_start = links.wait_for((demand, step.layer))
            seconds = compute(step) if callable(compute) else compute
            issued = compute_start + seconds if prefetch_after_compute else compute_start
            links.advance(issued)
            allowed = len(step.prefetch_targets)
            if prefetch_budget is not None:
                # Every demand load has landed before its layer computes: what is still in
                # flight is prefetches.
                allowed = min(allowed, max(prefetch_budget - links.num_pending, 0))
            for target in step.prefetch_targets[:allowed]:  # in issue order
                links.add(links.least_busy(prefetch_queues), target)
            not_issued.update(step.prefetch_targets[allowed:])
            result.stall_seconds += compute_start - start
            result.compute_seconds += lead_seconds + seconds
            result.loads += demand_loads + allowed
            clock = compute_start + seconds
        clock += extra_seconds_per_forward
        result.compute_seconds += extra_seconds_per_forward
    result.seconds = clock
    return result
