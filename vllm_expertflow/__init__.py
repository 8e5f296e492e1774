"""ExpertFlow: expert offloading for vLLM's MoE layers (`--moe-backend expertflow`)."""

from __future__ import annotations

from typing import Any


def get_stats(llm: Any) -> dict:
    """Cache statistics of an `LLM` built with `moe_backend="expertflow"`.

    Returns `{"total": {...}, "layers": {layer: {...}}}` with hits, misses, lookups, hit_rate,
    bytes_loaded and load_seconds, gathered from the worker process.
    """
    from vllm_expertflow.integration.runtime import worker_stats

    per_worker = llm.collective_rpc(worker_stats)
    models = [stats for worker in per_worker for stats in worker]
    if len(models) != 1:
        raise RuntimeError(
            f"expertflow: expected one offloaded model in the engine, found {len(models)}; "
            'was the LLM built with moe_backend="expertflow"?'
        )
    return models[0]


def reconfigure(llm: Any, options: dict) -> None:
    """Rebuilds the expert pool of a loaded `LLM` with new `expertflow` options.

    Same keys as `additional_config["expertflow"]`; the store must stay the same. Statistics
    restart from zero. Meant for comparing cache sizes, policies and predictors in one engine.
    """
    from vllm_expertflow.integration.runtime import reconfigure as reconfigure_worker

    llm.collective_rpc(reconfigure_worker, args=(options,))
