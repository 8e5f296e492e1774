"""Methods ExpertFlow adds to vLLM's worker, reachable with `LLM.collective_rpc("name")`.

vLLM mixes a configured `worker_extension_cls` into its worker class; the plugin sets this one
when `moe_backend` is "expertflow" (see `patches/moe_backend_option.py`), so no function has to
be pickled across processes. The engine is found through the worker's model, not a registry.
"""

from __future__ import annotations

from vllm_expertflow.core.engine import OffloadEngine
from vllm_expertflow.core.tracer import RoutingTracer

from .engine_hooks import offloaded_models


class ExpertFlowWorkerExtension:
    def expertflow_stats(self) -> dict:
        engine = self._expertflow_engine()
        return {**engine.stats.as_dict(), "slots": engine.pool.num_slots}

    def expertflow_reconfigure(self, options: dict) -> None:
        self._expertflow_engine().reconfigure(options)

    def expertflow_measure_load_seconds(self, count: int) -> list[float]:
        return self._expertflow_engine().pool.measure_load_seconds(count)

    def expertflow_start_tracing(
        self, directory: str, metadata: dict, max_tokens: int, sample_rate: float, seed: int
    ) -> None:
        """Records routing from the next forward on; `metadata` gets the MoE layers' real ids
        (dense first layers and interleaved MoE are not in the trace)."""
        engine = self._expertflow_engine()
        metadata = {**metadata, "layers": engine.layers}
        engine.tracer = RoutingTracer(directory, metadata, max_tokens, sample_rate, seed)

    def expertflow_stop_tracing(self) -> dict:
        """Flushes the trace; returns its manifest."""
        engine = self._expertflow_engine()
        manifest = engine.tracer.close()
        engine.tracer = None
        return manifest

    def _expertflow_engine(self) -> OffloadEngine:
        models = offloaded_models(self.model_runner.get_model())
        if not models or models[0].engine.pool is None:
            raise RuntimeError(
                "expertflow: this model has no MoE layer the expertflow backend offloads"
            )
        return models[0].engine
