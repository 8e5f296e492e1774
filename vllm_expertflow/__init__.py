"""ExpertFlow: expert offloading for vLLM's MoE layers (`--moe-backend expertflow`)."""

from __future__ import annotations

from typing import Any


def get_stats(llm: Any) -> dict:
    """Cache statistics of an `LLM` built with `moe_backend="expertflow"`.

    Returns `{"total": {...}, "layers": {layer: {...}}, "slots": N}` with hits, misses, lookups,
    hit_rate, bytes_loaded, load_seconds (and, for packed int4 slots, experts_decoded and
    decode_seconds) per layer and in total, and the pool's slot count, from the worker process.
    """
    return llm.collective_rpc("expertflow_stats")[0]


def reconfigure(llm: Any, options: dict) -> None:
    """Rebuilds the expert pool of a loaded `LLM` with new `expertflow` options.

    Same keys as `additional_config["expertflow"]`; the store must stay the same. Statistics
    restart from zero. Meant for comparing cache sizes, policies and predictors in one engine.
    """
    llm.collective_rpc("expertflow_reconfigure", args=(options,))


def measure_load_seconds(llm: Any, count: int = 64) -> tuple[float, ...]:
    """Seconds per expert load of an `LLM` built with `moe_backend="expertflow"`, with 1, 2, ...
    loads in flight, up to as many as its pool overlaps (the last figure): `count` loads
    through its store each time (the same reads), into scratch."""
    return tuple(llm.collective_rpc("expertflow_measure_load_seconds", args=(count,))[0])
