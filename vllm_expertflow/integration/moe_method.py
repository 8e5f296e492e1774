"""ExpertFlow's MoE method: vLLM's unquantized MoE, with experts served from a paged pool.

A thin adapter: it keeps vLLM's checkpoint params off the device, writes each layer's experts to
the store in the stock kernel's layout, and hands each forward to the core engine through one
opaque custom op. The step itself, router to kernel, is `core/moe_step.py`:

    vLLM's router -> [custom op expertflow::moe_step] -> OffloadEngine.run_layer
        -> HostStep / GraphStep (plan, pin + load, prefetch, remap, kernel, release)
        -> `_slot_kernel`: vLLM's stock modular kernel on the pool's slot tensors (on the
           CPU, the op its experts call, once checked equal: see `_cpu_op`)

Built only for layers of a model loaded with `moe_backend="expertflow"` (see
`patches/fused_moe_methods.py`); for any other backend it is exactly vLLM's
`UnquantizedFusedMoEMethod`, because the registry hands it every unquantized MoE layer then.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import torch
from torch.library import Library
from vllm._custom_ops import cpu_fused_moe
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (
    FusedMoEConfig,
    FusedMoEQuantConfig,
    biased_moe_quant_config,
)
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
from vllm.model_executor.layers.fused_moe.oracle.unquantized import (
    convert_to_unquantized_kernel_format,
)
from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)
from vllm.model_executor.utils import replace_parameter
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_expertflow.core.config import ExpertFlowConfigError
from vllm_expertflow.core.store import ExpertCodec

from .engine_hooks import OffloadedModel, layer_index, loading_model
from .patches import BACKEND_NAME

_KERNEL_LAYOUT_CHUNK = 8  # experts converted at a time, bounding the transient copy
_PARAM_OF = {"w13": "w13_weight", "w2": "w2_weight"}  # stored name -> the layer's parameter


class ExpertFlowMoEMethod(UnquantizedFusedMoEMethod):
    def __init__(self, moe: FusedMoEConfig) -> None:
        self.offloaded: OffloadedModel | None = None
        self.slot_biases: dict[str, torch.Tensor] = {}
        if moe.moe_backend != BACKEND_NAME:
            super().__init__(moe)
            return
        # The stock oracle picks the platform's kernel; ours only decides where weights live.
        super().__init__(dataclasses.replace(moe, moe_backend="auto"))
        self.offloaded = loading_model()
        self.layer_index = -1
        self._in_place_prepack: bool | None = None  # decided on the first write
        self._cpu_op_is_stock: bool | None = None  # decided on the first forward
        # The kernel indexes expert biases by the ids it is given, slot ids here: it reads
        # these, which `_slot_kernel` binds to the pool's slot biases before each call.
        if moe.has_bias:
            self.slot_biases = {"w13_bias": torch.empty(0), "w2_bias": torch.empty(0)}

    @property
    def mk_can_overlap_shared_experts(self) -> bool:  # type: ignore[override]
        # Shared experts run for every token from their own resident weights, outside the pool.
        # vLLM's runner computes them (on a side stream on CUDA, overlapping the routed experts)
        # instead of the kernel, which may run once per round here.
        return self.offloaded is None and super().mk_can_overlap_shared_experts

    @property
    def requires_device_loading(self) -> bool:  # type: ignore[override]
        # Offloaded experts are converted from host memory; moving them to the device first
        # would materialise every expert there.
        return self.offloaded is None

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
        if self.offloaded is None:
            return super().create_weights(*args, **extra_weight_attrs)
        with torch.device(self.register_layer(layer, num_experts, extra_weight_attrs)):
            return super().create_weights(*args, **extra_weight_attrs)

    def register_layer(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        extra_weight_attrs: dict,
        codec: ExpertCodec | None = None,
        store_format: str = "kernel layout",
    ) -> str:
        """Registers the layer with the engine; returns the device for its checkpoint params.

        Loaded in host memory, never on the device: the pool is the only device copy. A layer
        a verified disk store already holds is not read into memory at all.
        """
        self.layer_index = layer_index(layer.layer_name)
        engine = self.offloaded.engine
        engine.add_layer(
            self.layer_index,
            num_experts,
            self.moe.experts_per_token,
            functools.partial(self._slot_kernel, layer),
            f"{self.experts_cls.__name__}, {store_format}",
            codec,
            biased=self.moe.has_bias,
        )
        if engine.store.has_layer(self.layer_index):
            extra_weight_attrs["weight_loader"] = _skip_stored_weights
            return "meta"
        return "cpu"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.offloaded is None:
            return super().process_weights_after_loading(layer)
        if self.offloaded.engine.step_kind == "graph":
            if layer.activation != MoEActivation.SILU or layer.apply_router_weight_on_input:
                raise ExpertFlowConfigError(
                    "expertflow: step=graph's kernel computes SiLU-gated experts weighted on "
                    "their outputs; use step=host for this model"
                )
            # The graph step's own kernel reads the checkpoint layout, in the pool and the store.
            stored = lambda: {"w13": layer.w13_weight.data, "w2": layer.w2_weight.data}  # noqa: E731
        else:
            biases = {name: getattr(layer, name) for name in self.slot_biases}
            stored = lambda: self.to_kernel_layout(layer.w13_weight, layer.w2_weight, biases)  # noqa: E731
        self.store_layer(layer, stored)
        for name in ("w13_weight", "w2_weight", *self.slot_biases):
            replace_parameter(layer, name, torch.empty(0, dtype=getattr(layer, name).dtype))

    def store_layer(
        self, layer: torch.nn.Module, stored_tensors: Callable[[], dict[str, torch.Tensor]]
    ) -> None:
        """Writes the layer's experts to the store unless it holds them; builds the kernel."""
        self._init_moe_kernel(layer)
        store = self.offloaded.engine.store
        if not store.has_layer(self.layer_index):
            store.write_layer(self.layer_index, stored_tensors())

    def to_kernel_layout(
        self, w13: torch.Tensor, w2: torch.Tensor, biases: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Runs the stock kernel's own weight conversion (e.g. CPU prepacking) a chunk at a time.

        `w13: [E, 2I, H]`, `w2: [E, H, I]` in checkpoint layout, `biases` (`w13_bias: [E, 2I]`,
        `w2_bias: [E, H]`) if the experts have them; returns `{"w13", "w2"}` and the biases,
        converted too (the CPU kernel pads them with the weights).
        """
        parts: dict[str, list[torch.Tensor]] = {"w13": [], "w2": []}
        parts.update({name: [] for name in biases or {}})
        for start in range(0, w13.shape[0], _KERNEL_LAYOUT_CHUNK):
            chunk = torch.nn.Module()
            rows = slice(start, start + _KERNEL_LAYOUT_CHUNK)
            w13_chunk, w2_chunk = convert_to_unquantized_kernel_format(
                self.unquantized_backend,
                moe_config=self.moe,
                w13_weight=w13.data[rows],
                w2_weight=w2.data[rows],
                layer=chunk,
            )
            chunk.w13_weight = torch.nn.Parameter(w13_chunk.contiguous(), requires_grad=False)
            chunk.w2_weight = torch.nn.Parameter(w2_chunk.contiguous(), requires_grad=False)
            for name, bias in (biases or {}).items():
                bias_chunk = torch.nn.Parameter(bias.data[rows].clone(), requires_grad=False)
                setattr(chunk, name, bias_chunk)
            self.moe_kernel.fused_experts.process_weights_after_loading(chunk)
            for name, chunk_parts in parts.items():
                chunk_parts.append(getattr(chunk, _PARAM_OF.get(name, name)).data)
        return {name: torch.cat(chunk_parts) for name, chunk_parts in parts.items()}

    def write_kernel_layout(
        self, w13: torch.Tensor, w2: torch.Tensor, out: dict[str, torch.Tensor]
    ) -> None:
        """Writes experts in checkpoint layout (`w13: [n, 2I, H]`, `w2: [n, H, I]`) into
        kernel-layout tensors `out` (`[n, ...]` each: slots, or a decode scratch).

        Where the stock conversion is only the CPU kernel's prepacking (no padding, no
        zentorch), that op writes straight into `out`, with no converted copy to allocate and
        copy over; checked once against `to_kernel_layout`, which is used otherwise.
        """
        if self._in_place_prepack is None:
            self._in_place_prepack = self._prepacks_in_place(w13[:1], w2[:1])
        if self._in_place_prepack:
            isa = self.moe_kernel.fused_experts.isa
            torch.ops._C.prepack_moe_weight(w13, out["w13"], isa)
            torch.ops._C.prepack_moe_weight(w2, out["w2"], isa)
            return
        expanded = self.to_kernel_layout(w13, w2)
        for name, tensor in out.items():
            tensor.copy_(expanded[name], non_blocking=True)

    def _prepacks_in_place(self, w13: torch.Tensor, w2: torch.Tensor) -> bool:
        experts = self.moe_kernel.fused_experts
        if not isinstance(experts, CPUUnquantizedExperts) or w13.device.type != "cpu":
            return False
        expected = self.to_kernel_layout(w13, w2)
        if getattr(experts, "_use_zentorch", False) or expected["w13"].shape != w13.shape:
            return False
        converted = {name: torch.empty_like(t) for name, t in expected.items()}
        torch.ops._C.prepack_moe_weight(w13.contiguous(), converted["w13"], experts.isa)
        torch.ops._C.prepack_moe_weight(w2.contiguous(), converted["w2"], experts.isa)
        return all(torch.equal(converted[name], expected[name]) for name in expected)

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: SharedExperts | None,
        shared_experts_input: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.offloaded is None:
            return super().apply(
                layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input
            )
        # `shared_experts` is not ours to run: with mk_can_overlap_shared_experts False, vLLM's
        # runner has computed them already (they only run when called in the order it chose).
        # An opaque op: the step reads routing on the host, which torch.compile cannot trace.
        return torch.ops.expertflow.moe_step(x, topk_weights, topk_ids, layer.layer_name)

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> FusedMoEQuantConfig:
        config = super().get_fused_moe_quant_config(layer)
        if not self.slot_biases:
            return config
        return biased_moe_quant_config(
            self.slot_biases["w13_bias"],
            self.slot_biases["w2_bias"],
            gemm1_alpha=config.gemm1_alpha,
            gemm1_beta=config.gemm1_beta,
            gemm1_clamp_limit=config.gemm1_clamp_limit,
        )

    def _slot_kernel(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        slot_ids: torch.Tensor,
        weights: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """The stock kernel on slot tensors (the pool's, or a decode scratch's), router ids
        already remapped to their slot ids."""
        for name, bias in self.slot_biases.items():
            bias.data = weights[name]  # the pool may have been rebuilt since
        args = (layer, x, topk_weights, slot_ids, weights)
        if self._cpu_op_is_stock is None:
            self._cpu_op_is_stock = self._cpu_op_matches_stock(*args)
        return self._cpu_op(*args) if self._cpu_op_is_stock else self._stock_kernel(*args)

    def _stock_kernel(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        slot_ids: torch.Tensor,
        weights: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        w13 = weights["w13"]
        return self.moe_kernel.apply(
            hidden_states=x,
            w1=w13,
            w2=weights["w2"],
            topk_weights=topk_weights,
            topk_ids=slot_ids,
            activation=layer.activation,
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            global_num_experts=w13.shape[0],
            expert_map=None,
        )

    def _cpu_op(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        slot_ids: torch.Tensor,
        weights: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """The op vLLM's CPU experts call, without the modular kernel's Python around it.

        vLLM compiles that Python away for its own backend; the pool's step runs it eagerly,
        inside an opaque op, where it cost 57 of a call's 100 us (demo model, batch 1).
        """
        output = torch.empty_like(x)
        cpu_fused_moe(
            output,
            x,
            weights["w13"],
            weights["w2"],
            weights.get("w13_bias"),
            weights.get("w2_bias"),
            topk_weights,
            slot_ids,
            layer.activation.value,
            self.moe_kernel.fused_experts.isa,
        )
        return output

    def _cpu_op_matches_stock(self, *args) -> bool:
        """Whether `_cpu_op` is all the stock kernel does here: vLLM's CPU experts without
        zentorch or router weights on the input, and the same output on the first call."""
        layer, x = args[0], args[1]
        experts = self.moe_kernel.fused_experts
        if (
            not isinstance(experts, CPUUnquantizedExperts)
            or type(experts).apply is not CPUUnquantizedExperts.apply
            or getattr(experts, "_use_zentorch", False)
            or layer.apply_router_weight_on_input
            or x.device.type != "cpu"
        ):
            return False
        # vLLM's profiling forward feeds uninitialised activations: NaN matches NaN.
        return torch.allclose(
            self._cpu_op(*args), self._stock_kernel(*args), rtol=0, atol=0, equal_nan=True
        )


def _moe_step(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str
) -> torch.Tensor:
    runner = get_forward_context().no_compile_layers[layer_name]
    method = runner.routed_experts.quant_method
    offloaded = method.offloaded
    output = offloaded.engine.run_layer(method.layer_index, x, topk_weights, topk_ids)
    offloaded.layer_done()
    return output


def _moe_step_fake(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str
) -> torch.Tensor:
    return torch.empty_like(x)


_library = Library("expertflow", "FRAGMENT")
direct_register_custom_op("moe_step", _moe_step, fake_impl=_moe_step_fake, target_lib=_library)


def _skip_stored_weights(*args, return_success: bool = False, **kwargs) -> bool | None:
    """Weight loader for layers a verified disk store already holds."""
    return True if return_success else None
