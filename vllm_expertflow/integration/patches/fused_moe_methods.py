"""Patch: build ExpertFlow's MoE methods for vLLM's unquantized and int4 (WNA16) MoE layers.

Why:    vLLM picks a MoE layer's method from the checkpoint's quantization, not from
        `moe_backend`, and its unquantized oracle rejects backend names it does not know.
How:    register `ExpertFlowMoEMethod` as the out-of-tree `UnquantizedFusedMoEMethod` (vLLM's
        CustomOp registry), and replace the WNA16 class that compressed-tensors' MoE dispatch
        imports at call time. Both behave exactly as the stock classes unless the layer's
        `moe_backend` is expertflow. Applied by the model-loading patch, so only processes that
        load a model with the backend import them.
Remove: when vLLM lets an out-of-tree MoE backend provide methods by name.
Checked against: vLLM 0.32.0.
"""

from __future__ import annotations


def apply() -> None:
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (  # noqa: E501
        compressed_tensors_moe_wna16 as stock_wna16,
    )

    from ..moe_method import ExpertFlowMoEMethod
    from ..quantized_moe_method import ExpertFlowWNA16MoEMethod

    name = UnquantizedFusedMoEMethod.__name__
    if name not in op_registry_oot:
        UnquantizedFusedMoEMethod.register_oot(ExpertFlowMoEMethod, name=name)
    stock_wna16.CompressedTensorsWNA16MoEMethod = ExpertFlowWNA16MoEMethod
