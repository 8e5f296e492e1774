"""What one model's offloaded MoE layers share: options, store, pool, prefetcher and step.

Built explicitly, in this order, by whoever loads the model (the vLLM adapter, or a test):

    engine = OffloadEngine(config, device, make_store, model_dir)
    engine.add_layer(...)          each MoE layer as the model is built; the first opens the store
    engine.store.write_layer(...)  each layer's experts as its weights load (unless stored)
    engine.build(...)              the model is loaded: store -> pool -> prefetcher -> step
    engine.forward_started(...)    before every forward: finished requests, batch rows, host work
    engine.run_layer(...)          each MoE layer's forward (core/moe_step.py)

Pure torch: what comes from vLLM (the store's folder, request ids) is handed in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import torch

from .checkpoint import load_gate_weights, routing_config_hash
from .config import ExpertFlowConfig, ExpertFlowConfigError
from .decode_scratch import DecodeScratch
from .disk_store import DiskStore
from .link import EmulatedLink
from .moe_step import GraphStep, HostStep, MoEStep, PagedKernel, SlotKernel
from .policy import make_policy
from .pool import ExpertPool
from .predictor import GatePredictor, load_predictor
from .prefetcher import Prefetcher
from .previous_tokens import PreviousTokens, RequestSpans
from .stats import OffloadStats
from .store import ExpertCodec, ExpertStore, RamStore
from .tracer import RoutingTracer

logger = logging.getLogger(__name__)

# A packed pool's decode scratch holds this many tokens' experts: one kernel call at batch 1,
# a few per layer for larger batches (each expert decoded once per call that uses it).
DECODE_SCRATCH_TOKENS = 2

# make_store(num_experts, store_format) -> the backing store, opened by the first layer.
StoreFactory = Callable[[int, str], ExpertStore]


class OffloadEngine:
    def __init__(
        self,
        config: ExpertFlowConfig,
        device: torch.device,
        make_store: StoreFactory,
        model_dir: str,
    ) -> None:
        self.config = config
        self.device = device
        self.model_dir = model_dir
        self.stats = OffloadStats()
        self.previous_tokens = PreviousTokens()
        self.tracer: RoutingTracer | None = None
        self.store: ExpertStore | None = None
        self.codec = ExpertCodec()
        self.quantized = False
        self.biased = False
        self.step_kind = "host"  # resolved when the first layer says whether it is quantized
        self.pool: ExpertPool | None = None
        self.prefetcher: Prefetcher | None = None
        self.step: MoEStep | None = None
        self._make_store = make_store
        self._kernels: dict[int, SlotKernel] = {}
        self._top_k = 0
        self._spans: RequestSpans | None = None
        self._spans_of: Callable[[], RequestSpans] | None = None
        self._paged_kernel: tuple[PagedKernel, int] | None = None
        self._shared_expert_bytes = 0

    @property
    def layers(self) -> list[int]:
        """The MoE layers' ids, in order; they need not start at 0 or be contiguous."""
        return sorted(self._kernels)

    def add_layer(
        self,
        layer: int,
        num_experts: int,
        top_k: int,
        kernel: SlotKernel,
        store_format: str,
        codec: ExpertCodec | None = None,
        biased: bool = False,
    ) -> None:
        """Registers a MoE layer before its weights load; the first one opens the store.

        `kernel` computes the layer on slots (the host step); `store_format` names the stored
        layout (part of the disk store's key); `codec` expands stored records into slots;
        `biased`: the experts have biases, stored and loaded with their weights.
        """
        if self.store is None:
            self.quantized = codec is not None
            self.biased = biased
            self.step_kind = self.config.resolved_step(
                self.device.type, self.quantized, self.biased
            )
            self.store = self._make_store(num_experts, store_format)
            self.codec = codec or ExpertCodec()
        if num_experts != self.store.num_experts:
            raise ExpertFlowConfigError(
                f"expertflow: layer {layer} has {num_experts} experts and an earlier one "
                f"{self.store.num_experts}; models whose MoE layers differ in expert count are "
                "not supported"
            )
        self._top_k = max(self._top_k, top_k)
        self._kernels[layer] = kernel

    def build(
        self, paged_kernel: tuple[PagedKernel, int] | None = None, shared_expert_bytes: int = 0
    ) -> None:
        """The model is loaded and every layer stored: allocate the pool and the step.

        `paged_kernel` (the kernel and its most rows per call) is the graph step's;
        `shared_expert_bytes`, experts every token runs, stay resident outside the pool.
        """
        assert self.pool is None, "built twice"
        missing = [layer for layer in self.layers if not self.store.has_layer(layer)]
        assert not missing, f"layers {missing} were never written to the store"
        self.store.finish_writing()
        self._paged_kernel = paged_kernel
        self._shared_expert_bytes = shared_expert_bytes
        self._build_pool()

    def reconfigure(self, options: dict) -> None:
        """Rebuilds the pool, policy and predictor with new options, keeping the store.

        For benchmarks and tests that compare cache sizes and policies on one loaded engine.
        The store cannot change without reloading the model; on a GPU the pool may not grow past
        its start-up size, which vLLM's memory budget was computed with.
        """
        config = ExpertFlowConfig.from_dict(options)
        if (config.store, config.resolved_store_dir) != (
            self.config.store,
            self.config.resolved_store_dir,
        ):
            raise ExpertFlowConfigError("expertflow: reconfigure cannot change store or store_dir")
        if config.resolved_step(self.device.type, self.quantized, self.biased) != self.step_kind:
            raise ExpertFlowConfigError(
                f"expertflow: reconfigure cannot change step={self.step_kind}"
            )
        if self.step_kind == "graph" and self.device.type == "cuda":
            raise ExpertFlowConfigError(
                "expertflow: captured CUDA graphs hold the pool's addresses, so step=graph "
                "cannot rebuild it; start another engine to change the pool"
            )
        old_slots = self.pool.num_slots
        self.pool.close()
        self.config = config
        self._build_pool()
        if self.device.type == "cuda" and self.pool.num_slots > old_slots:
            raise ExpertFlowConfigError(
                f"expertflow: cannot grow the pool on a GPU past its {old_slots} start-up slots"
            )

    @property
    def reads_request_spans(self) -> bool:
        """Whether anything uses the batch's request spans: the tracer, a context predictor."""
        predictor = self.prefetcher.predictor if self.prefetcher is not None else None
        return self.tracer is not None or bool(predictor and predictor.context_inputs)

    def forward_started(
        self, spans_of: Callable[[], RequestSpans] | None, finished: set[str]
    ) -> None:
        """Before each forward, on the host and outside any CUDA graph.

        `spans_of()`: which batch rows belong to which request, asked (once) when a layer
        first needs it, by which time the caller's batch holds this forward's requests (None
        when not known); `finished`: requests that ended since the last forward.
        """
        self._spans_of = spans_of
        self._spans = None
        self.previous_tokens.forget(finished)
        if self.step is not None:
            self.step.between_forwards()

    def run_layer(
        self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """One MoE layer's routed experts on the pool; traced when a tracer is set."""
        output = self.step.run(layer, x, topk_weights, topk_ids)
        if self.tracer is not None:
            self.tracer.record(layer, x, topk_ids, output, self._rows_of(x.shape[0]))
        return output

    def snapshot(self) -> dict:
        pool = self.pool
        return {
            "stats": self.stats.as_dict(),
            "resident_slots": pool.table.num_resident if pool else 0,
            "slots": pool.num_slots if pool else 0,
            # (layer, expert) pairs in the pool: what expert-affinity routing matches against.
            "resident": [list(key) for key in pool.table.resident_keys()] if pool else [],
        }

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def _rows_of(self, num_rows: int) -> RequestSpans | None:
        """This forward's request spans, if they cover exactly `num_rows` rows."""
        if self._spans is None and self._spans_of is not None:
            self._spans = self._spans_of()
        if not self._spans or self._spans[-1][2] != num_rows:
            return None
        return self._spans

    def _context(
        self, layer: int, hidden: torch.Tensor, output: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return self.previous_tokens.context(layer, hidden, output, self._rows_of(len(hidden)))

    def _build_pool(self) -> None:
        layers, layout = self.layers, self.store.layout
        # int4_slots=packed: slots keep the stored records; the step decodes them for the kernel.
        packed = self.quantized and self.config.int4_slots == "packed"
        pool_codec = ExpertCodec() if packed else self.codec
        slot_bytes = sum(spec.nbytes for spec in pool_codec.slot_specs(layout))
        scratch_slots = min(self.store.num_experts, DECODE_SCRATCH_TOKENS * self._top_k)
        scratch_bytes = (
            scratch_slots * sum(spec.nbytes for spec in self.codec.slot_specs(layout))
            if packed
            else 0
        )
        num_slots = self.config.num_slots(
            len(layers), self.store.num_experts, self._top_k, slot_bytes, scratch_bytes
        )
        self.stats = OffloadStats()
        policy = make_policy(self.config.policy, num_slots, len(layers))
        policy.prepare()
        self.pool = None  # the old slots go before the new ones are allocated
        self.pool = ExpertPool(
            self.store,
            num_slots,
            self.device,
            layers,
            policy,
            self.stats,
            link=EmulatedLink(self.config.link_gbps) if self.config.link_gbps else None,
            codec=pool_codec,
        )
        scratch = DecodeScratch(self.pool, self.codec, scratch_slots) if packed else None
        self.prefetcher = self._make_prefetcher()
        if self.step_kind == "graph":
            kernel, max_tokens = self._paged_kernel
            assert isinstance(self.store, RamStore), "the graph step reads a RAM store"
            self.step = GraphStep(self.pool, self.store, kernel, max_tokens)
        else:
            self.step = HostStep(self.pool, self._kernels.__getitem__, self.prefetcher, scratch)
        every_expert = [(layer, e) for layer in layers for e in range(self.store.num_experts)]
        if self.config.static_experts is not None:
            self.pool.pin_permanently(self._static_hot_set(num_slots))
        elif num_slots == len(every_expert):
            # No first-use misses while serving; start-up loads are not serving statistics.
            self.pool.fill(every_expert)
            self.stats = self.pool.stats = OffloadStats()
        logger.info(
            "expertflow: %d expert slots for %d layers x %d experts (%.1f MiB pool, %.1f MiB "
            "of shared experts resident beside it, %.1f KiB read per load, %s store%s, policy "
            "%s, predictor %s, %s step%s)",
            num_slots,
            len(layers),
            self.store.num_experts,
            num_slots * slot_bytes / 2**20,
            self._shared_expert_bytes / 2**20,
            self.store.layout.nbytes / 2**10,
            self.config.store,
            f", reads bypass the page cache with {self.store.bypass}"
            if isinstance(self.store, DiskStore)
            else "",
            self.config.policy,
            self.config.predictor,
            self.step_kind,
            f", packed int4 slots decoded into a {scratch_bytes / 2**20:.1f} MiB scratch of "
            f"{scratch_slots} experts per kernel call"
            if packed
            else "",
        )

    def _static_hot_set(self, num_slots: int) -> list[tuple[int, int]]:
        """The hottest experts that leave one token's worth of slots free for misses."""
        with open(self.config.static_experts) as f:
            keys = [tuple(pair) for pair in json.load(f)]
        layers = set(self.layers)
        known = [k for k in keys if k[0] in layers and 0 <= k[1] < self.store.num_experts]
        if len(known) < len(keys):
            logger.warning(
                "expertflow: %d of the %d static_experts pairs name no offloaded MoE layer; "
                "they are skipped",
                len(keys) - len(known),
                len(keys),
            )
        return known[: max(0, num_slots - self._top_k)]

    def _make_prefetcher(self) -> Prefetcher | None:
        name = self.config.predictor
        if name == "none" or self.pool.num_slots >= len(self.layers) * self.store.num_experts:
            return None  # a pool that holds every expert never needs to guess
        if name == "gate":
            predictor = GatePredictor(load_gate_weights(self.model_dir), self.config.prefetch_depth)
        else:
            predictor = load_predictor(name, routing_config_hash(self.model_dir))
        return Prefetcher(
            self.pool, predictor, self.config.prefetch_depth, self._top_k, self._context
        )
