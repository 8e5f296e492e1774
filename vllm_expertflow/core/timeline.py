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
prefetch. A load occupies a queue for bytes / bandwidth + latency / io_queues. Compute per
layer-step is memory-bound decode: the layer's resident bytes it reads (attention, dense or
shared MLP, every distinct expert it runs) over device bandwidth, or its FLOPs over the FLOP
rate, whichever is longer, plus a fixed overhead per layer. A stall is the time a layer waits
for the link. Attention over the KV cache is left out (short contexts).
"""

from __future__ import annotations

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
    """The pool's loads as the clock sees them: `load_seconds` per expert on one queue;
    `prefetch_queues` background loads in flight; `demand_readers` None: demand loads join the
    same queues in issue order (one CUDA copy stream), else a layer's demand misses load that
    many at a time on readers of their own (the CPU pool's calling thread and demand readers)."""

    load_seconds: float
    prefetch_queues: int = 1
    demand_readers: int | None = None


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
) -> TimelineResult:
    """Puts the replay's forwards on one clock: `compute` gives a layer-step's compute time
    (from hardware figures with `compute_seconds`), or is one measured time for every
    layer-step; `extra_seconds_per_forward` (the non-MoE rest: embeddings, head) is added to
    each forward's compute. `prefetch_after_compute`: a layer's prefetches are issued when it
    has computed (predictors that read its output), not when it starts. `lead_seconds`: the
    part of each layer before its MoE step (attention): loads in flight go on landing during
    it, and a layer only waits, and issues its demand loads, once it has run."""
    result = TimelineResult()
    load = link.load_seconds
    clock = 0.0
    queues = [0.0] * link.prefetch_queues  # when each queue is next free
    landed: dict[int, float] = {}  # target layer -> when its last issued prefetch lands

    def enqueue(at: float) -> float:
        """A load issued at `at` on the queue free first; when it lands."""
        free = min(range(len(queues)), key=queues.__getitem__)
        queues[free] = max(queues[free], at) + load
        return queues[free]

    for forward in forwards:
        result.tokens += forward[0].tokens if forward else 0
        for step in forward:
            start = clock + lead_seconds
            ready = landed.pop(step.layer, 0.0)
            if step.demand_loads and link.demand_readers is None:
                ready = max(ready, *(enqueue(start) for _ in range(step.demand_loads)))
            elif step.demand_loads:
                ready = max(ready, start + -(-step.demand_loads // link.demand_readers) * load)
            compute_start = max(start, ready)
            seconds = compute(step) if callable(compute) else compute
            issued = compute_start + seconds if prefetch_after_compute else compute_start
            for target in step.prefetch_targets:  # in issue order
                landed[target] = max(landed.get(target, 0.0), enqueue(issued))
            result.stall_seconds += compute_start - start
            result.compute_seconds += lead_seconds + seconds
            result.loads += step.demand_loads + len(step.prefetch_targets)
            clock = compute_start + seconds
        clock += extra_seconds_per_forward
        result.compute_seconds += extra_seconds_per_forward
    result.seconds = clock
    return result
