"""What one engine's offloaded MoE layers share: options, the store, the pool and the stats.

Built from the vLLM config by the first MoE layer constructed in a process; every later layer of
the same model gets the same object. The pool is allocated once the last layer has been loaded
and written to the store, so it never coexists with a full copy of the experts on the device.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import json
import logging
import os
import re

import torch
from vllm.config import VllmConfig

from vllm_expertflow.core.config import ExpertFlowConfigError, OffloadConfig
from vllm_expertflow.core.device_page_table import DevicePageTable
from vllm_expertflow.core.disk_store import DiskStore
from vllm_expertflow.core.link import EmulatedLink
from vllm_expertflow.core.policy import make_policy
from vllm_expertflow.core.pool import ExpertPool
from vllm_expertflow.core.predictor import GatePredictor, load_predictor
from vllm_expertflow.core.prefetcher import Prefetcher
from vllm_expertflow.core.previous_tokens import PreviousTokens, RequestSpans
from vllm_expertflow.core.routing_log import RoutingLog
from vllm_expertflow.core.stats import OffloadStats
from vllm_expertflow.core.store import ExpertCodec, ExpertStore, RamStore
from vllm_expertflow.core.tracer import RoutingTracer

from .checkpoint import config_hash, load_gate_weights
from .metrics import SnapshotWriter
from .runner_patch import before_each_step

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def layer_index(layer_name: str) -> int:
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise ValueError(f"expertflow: cannot find a layer index in MoE layer name {layer_name!r}")
    return int(match.group(1))


class OffloadRuntime:
    _by_config: dict[int, tuple[VllmConfig, OffloadRuntime]] = {}

    @classmethod
    def for_vllm_config(cls, vllm_config: VllmConfig) -> OffloadRuntime:
        key = id(vllm_config)
        if key not in cls._by_config:
            cls._by_config[key] = (vllm_config, cls(vllm_config))
        return cls._by_config[key][1]

    def __init__(self, vllm_config: VllmConfig) -> None:
        options = (vllm_config.additional_config or {}).get("expertflow")
        self.config = OffloadConfig.from_dict(options)
        self.device = torch.device(vllm_config.device_config.device)
        self.stats = OffloadStats()
        self._model_config = vllm_config.model_config
        self._layers: set[int] = set()
        self._pending_layers: set[int] = set()
        self._top_k = 0
        self.store: ExpertStore | None = None
        self.codec = ExpertCodec()
        self.pool: ExpertPool | None = None
        self.prefetcher: Prefetcher | None = None
        # Both known once the first layer registers with its expert format.
        self.quantized = False
        self.step = "host"
        self.routing_log: RoutingLog | None = None
        self.previous_tokens = PreviousTokens()
        self._batch: tuple | None = None  # (model runner, scheduler output) of this step
        self._spans: RequestSpans | None = None
        self.tracer: RoutingTracer | None = None
        self.metrics = SnapshotWriter()
        atexit.register(self.shutdown)

    def register_layer(
        self,
        layer: int,
        num_experts: int,
        top_k: int,
        store_format: str,
        codec: ExpertCodec | None = None,
    ) -> None:
        """Called while the model is built, before any weight is loaded.

        `store_format` names the kernel and stored layout (part of the disk store's key);
        `codec` expands stored records into slots (a plain copy when None).
        """
        if self.store is None:
            self.quantized = codec is not None
            self.step = self.config.resolved_step(self.device.type, self.quantized)
            self.store = self._make_store(num_experts, store_format)
            self.codec = codec or ExpertCodec()
            before_each_step(self.step_started)
        assert num_experts == self.store.num_experts, "expertflow needs equal expert counts"
        self._top_k = max(self._top_k, top_k)
        self._layers.add(layer)
        self._pending_layers.add(layer)

    def layer_stored(self, layer: int) -> None:
        """Called once a layer's experts are in the store; the last one builds the pool."""
        self._pending_layers.discard(layer)
        if self._pending_layers or self.pool is not None:
            return
        self.store.finish_writing()
        self._build_pool()

    def reconfigure(self, options: dict) -> None:
        """Rebuilds the pool, policy and predictor with new options, keeping the store.

        For benchmarks and tests that compare cache sizes and policies on one loaded engine.
        The store cannot change without reloading the model; on a GPU the pool may not grow past
        its start-up size, which vLLM's memory budget was computed with.
        """
        config = OffloadConfig.from_dict(options)
        if (config.store, config.resolved_store_dir) != (
            self.config.store,
            self.config.resolved_store_dir,
        ):
            raise ExpertFlowConfigError("expertflow: reconfigure cannot change store or store_dir")
        if config.resolved_step(self.device.type, self.quantized) != self.step:
            raise ExpertFlowConfigError(f"expertflow: reconfigure cannot change step={self.step}")
        if self.step == "graph" and self.device.type == "cuda":
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

    def _build_pool(self) -> None:
        num_layers = len(self._layers)
        slot_bytes = sum(spec.nbytes for spec in self.codec.slot_specs(self.store.layout))
        num_slots = self.config.num_slots(
            num_layers, self.store.num_experts, self._top_k, slot_bytes
        )
        link = EmulatedLink(self.config.link_gbps) if self.config.link_gbps else None
        self.stats = OffloadStats()
        self.pool = None  # the old slots go before the new ones are allocated
        mirror = None
        if self.step == "graph":
            layers = sorted(self._layers)
            mirror = DevicePageTable(layers, self.store.num_experts, self.device)
            self.routing_log = RoutingLog(layers, self.store.num_experts, self.device)
        self.pool = ExpertPool(
            self.store,
            num_slots,
            self.device,
            make_policy(self.config.policy, num_slots, num_layers),
            self.stats,
            link=link,
            codec=self.codec,
            mirror=mirror,
        )
        self.prefetcher = self._make_prefetcher()
        if self.config.static_experts is not None:
            self.pool.pin_permanently(self._static_hot_set(num_slots))
        logger.info(
            "expertflow: %d expert slots for %d layers x %d experts (%.1f MiB pool, %.1f KiB "
            "read per load, %s store%s, policy %s, predictor %s, %s step)",
            num_slots,
            num_layers,
            self.store.num_experts,
            num_slots * slot_bytes / 2**20,
            self.store.layout.nbytes / 2**10,
            self.config.store,
            f", reads bypass the page cache with {self.store.bypass}"
            if isinstance(self.store, DiskStore)
            else "",
            self.config.policy,
            self.config.predictor,
            self.step,
        )

    def step_started(self, runner, scheduler_output) -> None:
        """Before each engine step, on the host and outside any CUDA graph."""
        self._batch, self._spans = (runner, scheduler_output), None
        self.previous_tokens.forget(scheduler_output.finished_req_ids)
        if self.step == "graph" and self.pool is not None:
            # The last forward's routing: book it and load its misses.
            for layer, experts in self.routing_log.collect().items():
                self.pool.admit(layer, experts)

    def layer_routed(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """A layer's experts are resident: predictors that need no more start prefetching."""
        if self.prefetcher is not None and not self.prefetcher.predictor.context_inputs:
            self.prefetcher.after_routing(layer, hidden, topk_ids)

    def layer_computed(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, output: torch.Tensor
    ) -> None:
        """A layer's MoE output exists: trace it; predictors that read it prefetch now."""
        if self.tracer is not None:
            self.tracer.record(layer, hidden, topk_ids, output)
        if self.prefetcher is not None and self.prefetcher.predictor.context_inputs:
            spans = self._request_spans(hidden.shape[0])
            context = self.previous_tokens.context(layer, hidden, output, spans)
            self.prefetcher.after_routing(layer, hidden, topk_ids, context)

    def _request_spans(self, num_rows: int) -> RequestSpans | None:
        """Which rows of this step's batch belong to which request, from vLLM's input batch.

        vLLM lays a step's tokens out request by request in its input batch's order. None when
        the rows do not add up (a padded or dummy batch).
        """
        if self._spans is None and self._batch is not None:
            runner, scheduler_output = self._batch
            spans, start = [], 0
            for request in runner.input_batch.req_ids:
                count = scheduler_output.num_scheduled_tokens.get(request, 0)
                if count:
                    spans.append((request, start, start + count))
                    start += count
            self._spans = spans
        if not self._spans or self._spans[-1][2] != num_rows:
            return None
        return self._spans

    def _static_hot_set(self, num_slots: int) -> list[tuple[int, int]]:
        """The hottest experts that leave one token's worth of slots free for misses."""
        with open(self.config.static_experts) as f:
            keys = [tuple(pair) for pair in json.load(f)]
        known = [k for k in keys if k[0] in self._layers and 0 <= k[1] < self.store.num_experts]
        return known[: max(0, num_slots - self._top_k)]

    def _make_prefetcher(self) -> Prefetcher | None:
        name, model = self.config.predictor, self._model_config.model
        if name == "none" or self.pool.num_slots >= len(self._layers) * self.store.num_experts:
            return None  # a pool that holds every expert never needs to guess
        if name == "gate":
            predictor = GatePredictor(load_gate_weights(model), self.config.prefetch_depth)
        else:
            predictor = load_predictor(name, config_hash(model))
        return Prefetcher(self.pool, predictor, self.config.prefetch_depth, self._top_k)

    def _make_store(self, num_experts: int, store_format: str) -> ExpertStore:
        if self.config.store == "ram":
            return RamStore(num_experts, pin_memory=self.device.type == "cuda")
        fingerprint = self._fingerprint(num_experts, store_format)
        digest = hashlib.blake2b(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        name = os.path.basename(os.path.normpath(self._model_config.model)) or "model"
        directory = os.path.join(self.config.resolved_store_dir, f"{name}-{digest[:16]}")
        return DiskStore(directory, fingerprint, num_experts)

    def _fingerprint(self, num_experts: int, store_format: str) -> dict:
        """What the stored bytes depend on: the checkpoint files, dtype and kernel layout."""
        import vllm

        model = self._model_config.model
        files = sorted(glob.glob(os.path.join(model, "*.safetensors")))
        return {
            "model": os.path.abspath(model) if os.path.isdir(model) else model,
            "checkpoint": [
                [os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files
            ],
            "dtype": str(self._model_config.dtype),
            "num_experts": num_experts,
            "format": store_format,
            "vllm": vllm.__version__,
        }

    @classmethod
    def only(cls) -> OffloadRuntime:
        """The one offloaded model of this worker process."""
        runtimes = [runtime for _, runtime in cls._by_config.values()]
        if len(runtimes) != 1:
            raise RuntimeError(
                f"expertflow: expected one offloaded model in this worker, found {len(runtimes)}"
            )
        return runtimes[0]

    def snapshot(self) -> dict:
        return {
            "stats": self.stats.as_dict(),
            "resident_slots": self.pool.table.num_resident if self.pool else 0,
            "slots": self.pool.num_slots if self.pool else 0,
            # (layer, expert) pairs in the pool: what expert-affinity routing matches against.
            "resident": [list(key) for key in self.pool.table.resident_keys()] if self.pool else [],
        }

    def step_finished(self) -> None:
        self.metrics.maybe_write(self.snapshot)

    def shutdown(self) -> None:
        if self.stats.layers:
            logger.info("expertflow stats: %s", self.stats.summary())
            self.metrics.write(self.snapshot())
