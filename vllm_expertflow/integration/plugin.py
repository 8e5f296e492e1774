"""vLLM plugin entry point (`vllm.general_plugins`), run in every vLLM process.

Cheap and fail-open: it applies the version-checked patches under `patches/` and imports no
worker-side code; the MoE methods are installed only where a model is loaded with the backend.
"""

from __future__ import annotations

import logging


def register() -> None:
    """Idempotent: vLLM may load general plugins several times in one process."""
    from vllm_expertflow.metrics import setup_metrics_channel

    from . import patches

    _route_logs_through_vllm()
    if patches.apply_all():
        setup_metrics_channel()


def _route_logs_through_vllm() -> None:
    """Our loggers print wherever vLLM's do, in the API server and in every worker."""
    ours = logging.getLogger("vllm_expertflow")
    if not any(isinstance(h, _ToVllmLogger) for h in ours.handlers):
        ours.addHandler(_ToVllmLogger())
        ours.setLevel(logging.getLogger("vllm").level or logging.INFO)
        ours.propagate = False


class _ToVllmLogger(logging.Handler):
    """Hands each record to vLLM's logger as it is emitted: some processes (the API server)
    set up vLLM's handlers only after plugins are loaded, so they cannot be copied then."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("vllm").handle(record)
