"""vLLM plugin entry point (`vllm.general_plugins`), run in every vLLM process.

Cheap and fail-open: it applies the version-checked patches under `patches/` and imports no
worker-side code; the MoE methods are installed only where a model is loaded with the backend.
"""

from __future__ import annotations

import logging
import multiprocessing


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
    if not any(isinstance(h, _ToVllmHandlers) for h in ours.handlers):
        ours.addHandler(_ToVllmHandlers())
        ours.setLevel(logging.getLogger("vllm").level or logging.INFO)
    if multiprocessing.parent_process() is not None:
        # An engine or worker process: vLLM's CPU MoE code calls `logging.debug()`, which gives
        # the root logger basicConfig's handler, so a propagated record would print twice. A
        # top process keeps propagating: its owner's logging setup (pytest's too) sees ours.
        ours.propagate = False


class _ToVllmHandlers(logging.Handler):
    """Hands each record to the handlers vLLM's logger has when it is emitted: some processes
    (the API server) set them up only after plugins are loaded, so they cannot be copied then.
    Records also propagate to the root logger in a top process (see the caller)."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger("vllm").handlers:
            # A stream closed under it (pytest closes its captured stdout before the exit
            # hooks that log the last stats run) would print a "Logging error" traceback.
            if getattr(getattr(handler, "stream", None), "closed", False):
                continue
            if record.levelno >= handler.level:
                handler.handle(record)
