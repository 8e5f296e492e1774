"""One MoE layer's forward with offloaded experts, from the router's choice to the kernel.

The one owner of the step: the engine (through vLLM) and the GPU check run these classes, the
offline replay runs the host step's bookkeeping (`pinned_rounds`: pin, load, prefetch, release)
alone. The kernel is injected, so this file stays pure torch.

    vLLM's router: topk_ids [T, k], topk_weights [T, k]                     (vLLM's, unchanged)
        |
        +-- HostStep (option step=host: the CPU, quantized experts, predictors) ----------------+
        |   (a pool that holds every expert skips to [Kernel], on the layer's own slots in      |
        |   expert order, with the router's ids as they are: nothing can miss or be evicted)    |
        |   [Plan]      plan_rounds: whole tokens grouped so each round's experts fit the pool  |
        |   [Pin+Load]  (pinned_rounds, per round) ExpertPool.ensure_resident: page-table       |
        |               lookup, pin the hits, wait for any still in flight, load the misses     |
        |               (evicting unpinned experts)                                             |
        |   [Prefetch]  Prefetcher.after_routing: predictors of router inputs queue layers      |
        |               L+1..L+d's likeliest experts, loaded in the background (one round only) |
        |   [Remap]     DevicePageTable.remap: router ids -> slot ids, one gather               |
        |   [Decode]    (pools of stored records, e.g. packed int4) DecodeScratch.decode: the   |
        |               round's slots decoded into a few kernel-layout slots; ids remapped      |
        |   [Kernel]    kernel(x, topk_weights, slot_ids, weights): vLLM's stock kernel on the  |
        |               pool's slot tensors (or the scratch's)                                  |
        |   [Release]   unpin the round's slots (pinned_rounds, when asked for the next round)  |
        |   [Prefetch]  Prefetcher.after_compute: predictors that read layer L's output         |
        +---------------------------------------------------------------------------------------+
        |
        +-- GraphStep (option step=graph: CUDA-graph safe, no host sync) -----------------------+
        |   [Mark]      RoutingLog.record: the routed experts, marked on the device             |
        |   [Kernel]    kernel(x, topk_ids, topk_weights, page-table row, pool, host store):    |
        |               each expert read from its slot or, on a miss, from pinned host memory   |
        |   between forwards, on the host: RoutingLog.collect -> ExpertPool.admit (book the     |
        |               lookups, load the misses into slots for the next forward)               |
        |   An uncaptured prefill larger than the kernel's tile loads what fits first.          |
        +---------------------------------------------------------------------------------------+
        v
    output [T, H]
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing

import torch

from .decode_scratch import DecodeScratch
from .pool import ExpertPool
from .prefetcher import Prefetcher
from .routing_log import RoutingLog
from .step_plan import Round, TokenGroup, plan_rounds
from .store import RamStore

# kernel(x, topk_weights, slot_ids, weights) -> output: computes on weights["w13"] / ["w2"]
# (and the experts' biases, if any), each `[slots, ...]`, indexed by `slot_ids`.
SlotKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor
]
# kernel(x, topk_ids, topk_weights, slot_of_expert, pool_w13, pool_w2, host_w13, host_w2).
PagedKernel = Callable[..., torch.Tensor]


class HostWaitInGraphError(RuntimeError):
    """The host step would wait for loads inside a CUDA graph capture."""


class MoEStep(ABC):
    """One layer's forward on the pool; `between_forwards` runs on the host before each forward."""

    def __init__(self, pool: ExpertPool) -> None:
        self.pool = pool

    @abstractmethod
    def run(
        self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor: ...

    def between_forwards(self) -> None:
        """Host work that must not run inside a forward (a captured graph skips Python)."""


class HostStep(MoEStep):
    """Loads the misses on the host, then runs the injected kernel on slots: exact, may wait."""

    def __init__(
        self,
        pool: ExpertPool,
        kernel_of: Callable[[int], SlotKernel],
        prefetcher: Prefetcher | None,
        scratch: DecodeScratch | None = None,
    ) -> None:
        """`kernel_of(layer)`: the kernel for that layer (layers may differ in activation);
        `scratch`: where a pool that keeps records as stored has them decoded for the kernel."""
        super().__init__(pool)
        self.kernel_of = kernel_of
        self.prefetcher = prefetcher
        self.scratch = scratch
        self._kernel_seconds = 0.0  # of the layer-step running now

    def run(
        self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise HostWaitInGraphError(
                "expertflow: step=host waits for loads on the host, which a CUDA graph cannot "
                "capture; use step=graph (ram store, bf16 experts, no predictor) or enforce_eager"
            )
        started = time.perf_counter()
        self._kernel_seconds = 0.0
        output = self._run(layer, x, topk_weights, topk_ids)
        self.pool.stats.record_step(layer, time.perf_counter() - started, self._kernel_seconds)
        return output

    def _run(
        self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        kernel = self.kernel_of(layer)
        if self.pool.holds_every_expert:
            # Nothing can miss or be evicted: book the lookups, remap, compute.
            # One token's top-k experts are distinct: no `unique` op for a decode step of one.
            looked_up = topk_ids.shape[1] if len(topk_ids) == 1 else topk_ids.unique().numel()
            self.pool.stats.record_lookups(layer, looked_up, 0)
            if self.pool.layer_views is not None and self.scratch is None:
                # The layer's own slots, in expert order: the router's ids need no remap
                # (a gather costing a fifth of a demo layer's kernel time).
                weights = self.pool.layer_views[layer]
                return self._timed(kernel, x, topk_weights, topk_ids, weights)
            slot_ids = self.pool.device_table.remap(layer, topk_ids)
            return self._compute(kernel, layer, x, topk_weights, slot_ids)
        # Counting hot-set experts against the free slots too is conservative but always fits.
        rounds = plan_rounds(topk_ids, self.pool.round_capacity)
        output = None if len(rounds) == 1 else torch.empty_like(x)
        pinned = pinned_rounds(self.pool, self.prefetcher, layer, rounds, x, topk_ids)
        with closing(pinned):
            for tokens, _ in pinned:
                rows = slice(None) if tokens is None else tokens
                slot_ids = self.pool.device_table.remap(layer, topk_ids[rows])
                computed = self._compute(kernel, layer, x[rows], topk_weights[rows], slot_ids)
                if output is None:
                    output = computed
                else:
                    output[rows] = computed
        if self.prefetcher is not None:
            self.prefetcher.after_compute(layer, x, topk_ids, output)
        return output

    def _compute(
        self,
        kernel: SlotKernel,
        layer: int,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        slot_ids: torch.Tensor,
    ) -> torch.Tensor:
        if self.scratch is None:
            return self._timed(kernel, x, topk_weights, slot_ids, self.pool.slot_tensors)
        # Decoded a scratch-full at a time: whole tokens per call, as rounds are.
        chunks = plan_rounds(slot_ids, self.scratch.capacity)
        output = torch.empty_like(x) if len(chunks) > 1 else None
        for tokens, _ in chunks:
            rows = slice(None) if tokens is None else tokens
            scratch_ids, weights = self.scratch.decode(layer, slot_ids[rows])
            computed = self._timed(kernel, x[rows], topk_weights[rows], scratch_ids, weights)
            if output is None:
                return computed
            output[rows] = computed
        return output

    def _timed(
        self,
        kernel: SlotKernel,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        slot_ids: torch.Tensor,
        weights: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        started = time.perf_counter()
        output = kernel(x, topk_weights, slot_ids, weights)
        self._kernel_seconds += time.perf_counter() - started
        return output


def pinned_rounds(
    pool: ExpertPool,
    prefetcher: Prefetcher | None,
    layer: int,
    rounds: list[Round] | list[TokenGroup],
    x: torch.Tensor,
    topk_ids: torch.Tensor,
) -> Iterator[tuple[torch.Tensor | list[int] | None, list[int]]]:
    """The host step's bookkeeping: yields each round of `plan_rounds` with its slots, pinned
    (hits touched, misses loaded, the prefetches queued) until the caller asks for the next
    round. `HostStep.run` computes between the yields; the offline replay only iterates."""
    booked: set[int] = set()
    for tokens, experts in rounds:
        slots = pool.ensure_resident(layer, experts, booked)
        booked.update(experts)
        # After this layer's experts are pinned, so no prefetch can evict them; a layer that
        # alone oversubscribes the pool leaves no room to prefetch while it computes.
        if len(rounds) == 1 and prefetcher is not None:
            prefetcher.after_routing(layer, x, topk_ids)
        try:
            yield tokens, slots
        finally:
            pool.release(slots)


class GraphStep(MoEStep):
    """The kernel serves misses from pinned host memory; the host books them between forwards."""

    def __init__(
        self, pool: ExpertPool, store: RamStore, kernel: PagedKernel, max_tokens: int
    ) -> None:
        """`max_tokens`: the most rows one kernel call takes; larger batches run in chunks."""
        super().__init__(pool)
        self.store = store
        self.kernel = kernel
        self.max_tokens = max_tokens
        self.routing_log = RoutingLog(pool.device_table.layers, store.num_experts, pool.device)

    def run(
        self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        pool, num_tokens = self.pool, x.shape[0]
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if num_tokens > self.max_tokens and not capturing:
            # A prefill chunk: load what fits so the chunks read the pool rather than the link.
            pool.admit(layer, topk_ids.unique().tolist())
            start = time.perf_counter()
            pool.drain()
            pool.stats.record_stall(layer, time.perf_counter() - start)
        else:
            self.routing_log.record(layer, topk_ids)
        host = self.store.layer_tensors(layer)
        row = pool.device_table.row(layer)
        chunks = [
            self.kernel(
                x[start : start + self.max_tokens],
                topk_ids[start : start + self.max_tokens],
                topk_weights[start : start + self.max_tokens],
                row,
                pool.w13,
                pool.w2,
                host["w13"],
                host["w2"],
            )
            for start in range(0, num_tokens, self.max_tokens)
        ]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def between_forwards(self) -> None:
        """The last forward's routing: book it and load its misses."""
        for layer, experts in self.routing_log.collect().items():
            self.pool.admit(layer, experts)
