"""Int4 (compressed-tensors W4A16, from GPTQ or AWQ) experts served with offloading.

The store keeps each expert packed: int4 weights with their group scales (and zero points for
asymmetric schemes), so a load reads about a quarter of bf16's bytes. The codec expands a
record with this project's unpacking (`core/int4.py`, bit for bit compressed-tensors') into
the stock bf16 kernel's layout, either on load into a bf16 slot (`int4_slots=bf16`) or, when
slots keep records packed (`int4_slots=packed`), into the step's decode scratch right before
each kernel call; from there a step is exactly the unquantized one.

vLLM's packed int4 CPU MoE kernel (`CPUExpertsInt4`) needs AMX tiles, and no GPU int4 kernel is
wired to the pool yet, so the kernel always reads expanded bf16 weights.
"""

from __future__ import annotations

import functools
import logging
import threading

import torch
from compressed_tensors.quantization import QuantizationArgs
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExperts
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
    CompressedTensorsMoEMethod,
)
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
    compressed_tensors_moe_wna16 as stock_wna16,
)
from vllm.model_executor.utils import replace_parameter

from vllm_expertflow.core.int4 import Int4Packing
from vllm_expertflow.core.store import ExpertCodec, ExpertLayout, TensorSpec

from .moe_method import ExpertFlowMoEMethod
from .patches import BACKEND_NAME
from .support import check_expert_scheme

logger = logging.getLogger(__name__)

# The layer's checkpoint params, as CompressedTensorsWNA16MoEMethod.create_weights names them,
# and the record part each becomes.
_STORED_PARAMS = {
    "w13_packed": "w13_weight_packed",
    "w13_scale": "w13_weight_scale",
    "w13_zero_point": "w13_weight_zero_point",
    "w2_packed": "w2_weight_packed",
    "w2_scale": "w2_weight_scale",
    "w2_zero_point": "w2_weight_zero_point",
}
_SHAPE_PARAMS = ("w13_weight_shape", "w2_weight_shape")


class PackedInt4Codec(ExpertCodec):
    """Decodes pack-quantized expert records into the stock bf16 kernel's slot layout."""

    def __init__(
        self,
        weights: QuantizationArgs,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        bf16_method: ExpertFlowMoEMethod,
    ) -> None:
        self.packing = Int4Packing(weights.group_size, weights.symmetric)
        self.w13_shape = (2 * intermediate_size, hidden_size)
        self.w2_shape = (hidden_size, intermediate_size)
        self.dtype = dtype
        self.bf16_method = bf16_method
        self._slot_specs: tuple[TensorSpec, ...] | None = None
        self._buffers = threading.local()

    def slot_specs(self, layout: ExpertLayout) -> tuple[TensorSpec, ...]:
        if self._slot_specs is None:
            # The kernel's layout may pad or block the weights: ask it, with one empty expert.
            slot = self.bf16_method.to_kernel_layout(
                torch.zeros(1, *self.w13_shape, dtype=self.dtype),
                torch.zeros(1, *self.w2_shape, dtype=self.dtype),
            )
            self._slot_specs = tuple(
                TensorSpec(name, tuple(slot[name].shape[1:]), slot[name].dtype)
                for name in ("w13", "w2")
            )
        return self._slot_specs

    def dequantize(self, records: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """n experts' `w13: [n, 2I, H]` and `w2: [n, H, I]` in the checkpoint's dtype, in this
        thread's work buffers (valid until its next call)."""
        return self._dequantize(records, "w13", self.w13_shape), self._dequantize(
            records, "w2", self.w2_shape
        )

    def decode(self, records: dict[str, torch.Tensor], slots: dict[str, torch.Tensor]) -> None:
        w13, w2 = self.dequantize(records)
        self.bf16_method.write_kernel_layout(w13, w2, slots)

    def _dequantize(
        self, records: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int]
    ) -> torch.Tensor:
        packed, scale = records[f"{prefix}_packed"], records[f"{prefix}_scale"]
        dense = self._work_buffer(prefix, (packed.shape[0], *shape), scale.dtype, packed.device)
        self.packing.dequantize(packed, scale, records.get(f"{prefix}_zero_point"), dense)
        return dense.to(self.dtype)

    def _work_buffer(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A buffer kept per thread (loads decode on several I/O threads at once): a fresh
        multi-MiB tensor per step would fault in new pages every time."""
        buffers = self._buffers.__dict__
        buffer = buffers.get(name)
        if buffer is None or buffer.shape[0] < shape[0] or buffer.device != device:
            # A normal tensor even when first asked for inside a forward: loads outside one
            # (pool rebuilds) write it too, which an inference tensor refuses.
            with torch.inference_mode(False):
                buffer = buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buffer[: shape[0]]


class ExpertFlowWNA16MoEMethod(stock_wna16.CompressedTensorsWNA16MoEMethod):
    """vLLM's compressed-tensors WNA16 MoE method; with `--moe-backend expertflow` the experts
    are offloaded in packed form. Exactly the stock method otherwise."""

    def __init__(
        self,
        weight_quant: QuantizationArgs,
        input_quant: QuantizationArgs | None,
        moe: FusedMoEConfig,
        layer_name: str | None = None,
    ) -> None:
        self.bf16_method: ExpertFlowMoEMethod | None = None
        if moe.moe_backend != BACKEND_NAME:
            super().__init__(weight_quant, input_quant, moe, layer_name)
            return
        # Not the stock __init__: it would pick a platform int4 kernel (and fail without one).
        CompressedTensorsMoEMethod.__init__(self, moe)
        check_expert_scheme(weight_quant, input_quant)
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.symmetric = weight_quant.symmetric
        self.num_bits = weight_quant.num_bits
        self.packed_factor = 32 // weight_quant.num_bits
        self.strategy = weight_quant.strategy
        self.group_size = weight_quant.group_size
        # The bf16 method registers the layer, stores it and runs the bf16 kernel the slots feed.
        self.bf16_method = ExpertFlowMoEMethod(moe)
        _log_int4_path()

    @property
    def offloaded(self):
        return self.bf16_method.offloaded if self.bf16_method is not None else None

    @property
    def layer_index(self) -> int:
        return self.bf16_method.layer_index

    @property
    def requires_device_loading(self) -> bool:  # type: ignore[override]
        return self.bf16_method is None

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        args = (layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype)
        if self.bf16_method is None:
            return super().create_weights(*args, **extra_weight_attrs)
        codec = PackedInt4Codec(
            self.weight_quant,
            hidden_size,
            intermediate_size_per_partition,
            params_dtype,
            self.bf16_method,
        )
        scheme = "sym" if self.symmetric else "asym"
        store_format = f"int4 {scheme} group {self.group_size}, packed"
        device = self.bf16_method.register_layer(
            layer, num_experts, extra_weight_attrs, codec, store_format
        )
        with torch.device(device):
            return super().create_weights(*args, **extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.bf16_method is None:
            return super().process_weights_after_loading(layer)
        self.bf16_method.store_layer(layer, lambda: _packed_tensors(layer))
        for name in (*_STORED_PARAMS.values(), *_SHAPE_PARAMS):
            if hasattr(layer, name):
                param = getattr(layer, name)
                replace_parameter(layer, name, torch.empty(0, dtype=param.dtype))

    def get_fused_moe_quant_config(self, layer: torch.nn.Module):
        if self.bf16_method is None:
            return super().get_fused_moe_quant_config(layer)
        return self.bf16_method.get_fused_moe_quant_config(layer)

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: SharedExperts | None,
        shared_experts_input: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.bf16_method is None:
            return super().apply(
                layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input
            )
        return self.bf16_method.apply(
            layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input
        )


def _packed_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The layer's packed checkpoint tensors as one record per expert."""
    return {
        part: getattr(layer, param).data
        for part, param in _STORED_PARAMS.items()
        if hasattr(layer, param)
    }


@functools.cache
def _log_int4_path() -> None:
    amx = torch.cpu._is_amx_tile_supported()
    logger.info(
        "expertflow: int4 experts stay packed in the store and are dequantised into bf16 slots "
        "on load (this CPU %s AMX; vLLM's packed int4 MoE kernel, which needs it, is not used "
        "with offloading)",
        "has" if amx else "lacks",
    )
