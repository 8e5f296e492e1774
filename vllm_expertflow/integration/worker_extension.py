"""Methods ExpertFlow adds to vLLM's worker, reachable with `LLM.collective_rpc("name")`.

vLLM mixes a configured `worker_extension_cls` into its worker class; the plugin sets this one
when `moe_backend` is "expertflow" (see `moe_backend_patch`), so no function has to be pickled
across processes.
"""

from __future__ import annotations

from vllm_expertflow.core.tracer import RoutingTracer

from .runtime import OffloadRuntime


class ExpertFlowWorkerExtension:
    def expertflow_stats(self) -> dict:
        return OffloadRuntime.only().stats.as_dict()

    def expertflow_reconfigure(self, options: dict) -> None:
        OffloadRuntime.only().reconfigure(options)

    def expertflow_start_tracing(
        self, directory: str, metadata: dict, max_tokens: int, sample_rate: float, seed: int
    ) -> None:
        """Records routing from the next step on."""
        runtime = OffloadRuntime.only()
        runtime.tracer = RoutingTracer(directory, metadata, max_tokens, sample_rate, seed)

    def expertflow_stop_tracing(self) -> dict:
        """Flushes the trace; returns its manifest."""
        runtime = OffloadRuntime.only()
        manifest = runtime.tracer.close()
        runtime.tracer = None
        return manifest
