"""What ExpertFlow takes from vLLM, per model load and per forward, handed to the core engine.

- A model load (`patches/model_loading.py`) opens an `OffloadedModel`: the core engine plus the
  adapter's metrics writer. The MoE layers built during that load find it with `loading_model()`;
  once vLLM has loaded and processed every weight, `finish_loading` builds the engine's pool and
  step. No process-wide registry: afterwards the engine is reached through the model's layers.
- Before each forward (`patches/model_runner.py`), `before_forward` hands the engine which batch
  rows belong to which request and which requests finished.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

from vllm_expertflow.core.config import ExpertFlowConfig
from vllm_expertflow.core.disk_store import DiskStore
from vllm_expertflow.core.engine import OffloadEngine
from vllm_expertflow.core.previous_tokens import RequestSpans
from vllm_expertflow.core.store import ExpertStore, RamStore
from vllm_expertflow.core.store_catalog import list_stores, store_fingerprint, store_folder
from vllm_expertflow.metrics import SnapshotWriter

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class OffloadedModel:
    """One loaded model's engine, and the adapter's metrics channel beside it."""

    def __init__(self, engine: OffloadEngine) -> None:
        self.engine = engine
        self.metrics = SnapshotWriter()

    def layer_done(self) -> None:
        self.metrics.maybe_write(self.engine.snapshot)

    def shutdown(self) -> None:
        logger.info("expertflow stats: %s", self.engine.stats.summary())
        self.metrics.write(self.engine.snapshot(), final=True)


_loading: contextvars.ContextVar[OffloadedModel | None] = contextvars.ContextVar(
    "expertflow_loading", default=None
)


@contextlib.contextmanager
def open_model_load(vllm_config: Any, model_config: Any) -> Iterator[OffloadedModel]:
    """The scope of one model load with the expertflow backend."""
    options = (vllm_config.additional_config or {}).get("expertflow")
    device = torch.device(vllm_config.device_config.device)
    config = ExpertFlowConfig.from_dict(options)

    def make_store(num_experts: int, store_format: str) -> ExpertStore:
        return _make_store(config, device, model_config, num_experts, store_format)

    model = OffloadedModel(OffloadEngine(config, device, make_store, model_config.model))
    token = _loading.set(model)
    try:
        yield model
    finally:
        _loading.reset(token)


def loading_model() -> OffloadedModel:
    """The model being loaded in this thread; for MoE layers as they are built."""
    model = _loading.get()
    if model is None:
        raise RuntimeError(
            "expertflow: a MoE layer was built outside vLLM's model loader (a loader that "
            "overrides BaseModelLoader.load_model); use the default load_format"
        )
    return model


def finish_loading(model: OffloadedModel, module: torch.nn.Module) -> None:
    """Every weight of `module` is loaded and stored: build the pool and the step."""
    engine = model.engine
    if not engine.layers:
        logger.warning(
            "expertflow: the model has no MoE layer the backend offloads, so its options "
            "(store, cache size, predictor) have no effect"
        )
        return
    paged_kernel = None
    if engine.step_kind == "graph":
        # Imported on first use: Triton decides when a kernel module is imported whether to
        # run it in its interpreter (TRITON_INTERPRET=1, how a CPU runs this step in tests).
        from vllm_expertflow.kernels.fused_moe_uva import MAX_TOKENS, fused_moe_uva

        paged_kernel = (fused_moe_uva, MAX_TOKENS)
    engine.build(paged_kernel, shared_expert_bytes(module))
    model.metrics.write(engine.snapshot())  # `/metrics` shows the pool before any request
    atexit.register(model.shutdown)


def shared_expert_bytes(module: torch.nn.Module) -> int:
    """Bytes of the experts every token runs (shared experts): resident, outside the pool."""
    return sum(
        param.nbytes
        for name, param in module.named_parameters()
        if ".shared_expert" in name  # shared_expert (Qwen2-MoE, Llama-4), shared_experts
    )


def offloaded_models(module: torch.nn.Module) -> list[OffloadedModel]:
    """The offloaded models whose MoE layers are inside `module`, each once."""
    found: dict[int, OffloadedModel] = {}
    for child in module.modules():
        offloaded = getattr(getattr(child, "quant_method", None), "offloaded", None)
        if isinstance(offloaded, OffloadedModel):
            found.setdefault(id(offloaded), offloaded)
    return list(found.values())


def before_forward(runner: Any, scheduler_output: Any) -> None:
    """Before each forward of a model runner: hand its engines the batch's requests."""
    models = _models_of_runner(runner)
    if not models:
        return
    wanted = any(model.engine.reads_request_spans for model in models)
    # Read when a layer asks: vLLM adds this forward's new requests to the runner's input batch
    # only inside `execute_model`, after this hook.
    spans_of = functools.cache(lambda: request_spans(runner, scheduler_output)) if wanted else None
    for model in models:
        model.engine.forward_started(spans_of, scheduler_output.finished_req_ids)


def request_spans(runner: Any, scheduler_output: Any) -> RequestSpans:
    """Which rows of this forward's batch belong to which request.

    vLLM lays a forward's tokens out request by request in its input batch's order.
    """
    spans, start = [], 0
    for request in runner.input_batch.req_ids:
        count = scheduler_output.num_scheduled_tokens.get(request, 0)
        if count:
            spans.append((request, start, start + count))
            start += count
    return spans


def layer_index(layer_name: str) -> int:
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise ValueError(f"expertflow: cannot find a layer index in MoE layer name {layer_name!r}")
    return int(match.group(1))


def _models_of_runner(runner: Any) -> list[OffloadedModel]:
    # Looked up once per runner: walking the modules every forward would cost milliseconds.
    cached = runner.__dict__.get("_expertflow_models")
    if cached is None:
        if getattr(runner, "model", None) is None:
            return []  # not loaded yet
        cached = offloaded_models(runner.get_model())
        runner.__dict__["_expertflow_models"] = cached
    return cached


def _make_store(
    config: ExpertFlowConfig,
    device: torch.device,
    model_config: Any,
    num_experts: int,
    store_format: str,
) -> ExpertStore:
    if config.store == "ram":
        return RamStore(num_experts, pin_memory=device.type == "cuda")
    model = model_config.model
    fingerprint = store_fingerprint(model, store_format, str(model_config.dtype), num_experts)
    store_dir = config.resolved_store_dir
    directory = store_folder(store_dir, model, fingerprint)
    model_path = os.path.abspath(model) if os.path.isdir(model) else model
    for other in list_stores(store_dir):
        if other.model == model_path and other.path != directory:
            logger.info(
                "expertflow: another store of %s is at %s (%.1f GiB, %.0f days old%s); "
                "`vllm-expertflow store gc` removes stale ones",
                model,
                other.path,
                other.size_bytes / 2**30,
                other.age_seconds / 86400,
                "" if other.complete else ", incomplete",
            )
    return DiskStore(directory, fingerprint, num_experts, model_path)
