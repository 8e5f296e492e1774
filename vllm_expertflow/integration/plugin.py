"""vLLM plugin entry point (`vllm.general_plugins`), run in every vLLM process."""

from __future__ import annotations

import logging


def register() -> None:
    """Idempotent: vLLM may load general plugins several times in one process."""
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    from . import moe_backend_patch, quantized_moe_method
    from .metrics import setup_metrics_channel

    moe_backend_patch.apply()
    quantized_moe_method.install()
    _route_logs_through_vllm()
    setup_metrics_channel()
    name = UnquantizedFusedMoEMethod.__name__
    if name not in op_registry_oot:
        from .moe_method import ExpertFlowMoEMethod

        UnquantizedFusedMoEMethod.register_oot(ExpertFlowMoEMethod, name=name)


def _route_logs_through_vllm() -> None:
    """Our loggers print wherever vLLM's do, in the API server and in every worker."""
    ours = logging.getLogger("vllm_expertflow")
    if not ours.handlers:
        vllm_logger = logging.getLogger("vllm")
        for handler in vllm_logger.handlers:
            ours.addHandler(handler)
        ours.setLevel(vllm_logger.level or logging.INFO)
        ours.propagate = False
