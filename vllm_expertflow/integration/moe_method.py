"""ExpertFlow's MoE method: vLLM's unquantized MoE, with experts served from a paged pool.

One MoE step (one layer's forward), router to kernel:

    [Router]   vLLM's own router -> topk_ids [T, k], topk_weights [T, k]       (unchanged)
        |
    [Plan]     plan_rounds: group tokens so each round fits the slots not pinned for good
        |
    [Pool]     ExpertPool.ensure_resident(layer, experts): page-table lookup, pin the hits,
        |      wait for any still in flight, load the misses (evicting unpinned experts)
    [Prefetch] Prefetcher.after_routing: the predictor scores layers L+1..L+d's experts;
        |      the likeliest load in the background while this layer computes
    [Remap]    topk_ids -> slot ids through a per-layer expert -> slot table
        |
    [Kernel]   the platform's stock modular kernel on ExpertPool.w13 / ExpertPool.w2
        |
    [Release]  unpin the round's slots

When `moe_backend` is not "expertflow" this class is exactly vLLM's `UnquantizedFusedMoEMethod`:
it replaces that class for every layer once the plugin is loaded, so it must stay inert then.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from torch.library import Library
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
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
from vllm_expertflow.core.step_plan import plan_rounds
from vllm_expertflow.core.store import ExpertCodec

from .moe_backend_patch import BACKEND_NAME
from .runtime import OffloadRuntime, layer_index

_KERNEL_LAYOUT_CHUNK = 8  # experts converted at a time, bounding the transient copy


class ExpertFlowMoEMethod(UnquantizedFusedMoEMethod):
    def __init__(self, moe: FusedMoEConfig) -> None:
        self.runtime: OffloadRuntime | None = None
        if moe.moe_backend != BACKEND_NAME:
            super().__init__(moe)
            return
        # The stock oracle picks the platform's kernel; ours only decides where weights live.
        super().__init__(dataclasses.replace(moe, moe_backend="auto"))
        if moe.has_bias:
            raise ExpertFlowConfigError(
                "expertflow: MoE layers with expert biases are not supported; "
                "use another --moe-backend for this model"
            )
        self.runtime = OffloadRuntime.for_vllm_config(get_current_vllm_config())
        self.layer_index = -1
        self._slot_of_expert: torch.Tensor | None = None

    @property
    def requires_device_loading(self) -> bool:  # type: ignore[override]
        # Offloaded experts are converted from host memory; moving them to the device first
        # would materialise every expert there.
        return self.runtime is None

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
        if self.runtime is None:
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
        """Registers the layer with the runtime; returns the device for its checkpoint params.

        Loaded in host memory, never on the device: the pool is the only device copy. A layer
        a verified disk store already holds is not read into memory at all.
        """
        self.layer_index = layer_index(layer.layer_name)
        self.runtime.register_layer(
            self.layer_index,
            num_experts,
            self.moe.experts_per_token,
            f"{self.experts_cls.__name__}, {store_format}",
            codec,
        )
        self._slot_of_expert = torch.zeros(num_experts, dtype=torch.int32)
        if self.runtime.store.has_layer(self.layer_index):
            extra_weight_attrs["weight_loader"] = _skip_stored_weights
            return "meta"
        return "cpu"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.runtime is None:
            return super().process_weights_after_loading(layer)
        if self.runtime.step == "graph":
            if layer.activation != MoEActivation.SILU or layer.apply_router_weight_on_input:
                raise ExpertFlowConfigError(
                    "expertflow: step=graph's kernel computes SiLU-gated experts weighted on "
                    "their outputs; use step=host for this model"
                )
            # The graph step's own kernel reads the checkpoint layout, in the pool and the store.
            stored = lambda: {"w13": layer.w13_weight.data, "w2": layer.w2_weight.data}  # noqa: E731
        else:
            stored = lambda: self.to_kernel_layout(layer.w13_weight, layer.w2_weight)  # noqa: E731
        self.store_layer(layer, stored)
        replace_parameter(layer, "w13_weight", torch.empty(0, dtype=layer.w13_weight.dtype))
        replace_parameter(layer, "w2_weight", torch.empty(0, dtype=layer.w2_weight.dtype))

    def store_layer(
        self, layer: torch.nn.Module, stored_tensors: Callable[[], dict[str, torch.Tensor]]
    ) -> None:
        """Writes the layer's experts to the store unless it holds them; builds the kernel."""
        self._init_moe_kernel(layer)
        store = self.runtime.store
        if not store.has_layer(self.layer_index):
            store.write_layer(self.layer_index, stored_tensors())
        self.runtime.layer_stored(self.layer_index)
        self._slot_of_expert = self._slot_of_expert.to(self.runtime.device)

    def to_kernel_layout(self, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Runs the stock kernel's own weight conversion (e.g. CPU prepacking) a chunk at a time.

        `w13: [E, 2I, H]`, `w2: [E, H, I]` in checkpoint layout; returns `{"w13", "w2"}`.
        """
        w13_parts, w2_parts = [], []
        for start in range(0, w13.shape[0], _KERNEL_LAYOUT_CHUNK):
            chunk = torch.nn.Module()
            w13_chunk, w2_chunk = convert_to_unquantized_kernel_format(
                self.unquantized_backend,
                moe_config=self.moe,
                w13_weight=w13.data[start : start + _KERNEL_LAYOUT_CHUNK],
                w2_weight=w2.data[start : start + _KERNEL_LAYOUT_CHUNK],
                layer=chunk,
            )
            chunk.w13_weight = torch.nn.Parameter(w13_chunk.contiguous(), requires_grad=False)
            chunk.w2_weight = torch.nn.Parameter(w2_chunk.contiguous(), requires_grad=False)
            self.moe_kernel.fused_experts.process_weights_after_loading(chunk)
            w13_parts.append(chunk.w13_weight.data)
            w2_parts.append(chunk.w2_weight.data)
        return {"w13": torch.cat(w13_parts), "w2": torch.cat(w2_parts)}

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: SharedExperts | None,
        shared_experts_input: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.runtime is None:
            return super().apply(
                layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input
            )
        if shared_experts is not None:
            raise ExpertFlowConfigError(
                "expertflow: MoE layers with shared experts are not supported yet; "
                "use another --moe-backend for this model"
            )
        # An opaque op: the step reads routing on the host, which torch.compile cannot trace.
        return torch.ops.expertflow.moe_step(x, topk_weights, topk_ids, layer.layer_name)

    def run_step(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        runtime = self.runtime
        if runtime.step == "graph":
            output = self._run_graph_step(x, topk_weights, topk_ids)
        else:
            output = self._run_host_step(layer, x, topk_weights, topk_ids)
        runtime.layer_computed(self.layer_index, x, topk_ids, output)
        return output

    def _run_host_step(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        runtime, pool = self.runtime, self.runtime.pool
        if _is_capturing(x):
            raise ExpertFlowConfigError(
                "expertflow: step=host waits for loads on the host, which a CUDA graph cannot "
                "capture; use step=graph (ram store, bf16 experts, no predictor) or enforce_eager"
            )
        # Counting hot-set experts against the free slots too is conservative but always fits.
        rounds = plan_rounds(topk_ids, pool.step_capacity)
        if len(rounds) == 1:
            slots = pool.ensure_resident(self.layer_index, rounds[0][1])
            # After this layer's experts are pinned, so no prefetch can evict them.
            runtime.layer_routed(self.layer_index, x, topk_ids)
            return self._run_kernel(layer, x, topk_weights, topk_ids, rounds[0][1], slots)
        # The layer alone oversubscribes the pool: no room to prefetch while it computes
        # (predictors that read its output still do, in `layer_computed`).
        output = torch.empty_like(x)
        for tokens, experts in rounds:
            slots = pool.ensure_resident(self.layer_index, experts)
            output[tokens] = self._run_kernel(
                layer, x[tokens], topk_weights[tokens], topk_ids[tokens], experts, slots
            )
        return output

    def _run_graph_step(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """The kernel reads each expert from its slot or, on a miss, from the pinned host store.

        No host sync and fixed shapes, so vLLM can capture it in a CUDA graph: the step only
        marks which experts it used, and the runtime books them and loads the misses before
        the next step. An uncaptured prefill first loads what fits, so its chunks read the pool
        rather than the link.
        """
        # Imported on first use: Triton decides when a kernel module is imported whether to
        # run it in its interpreter (TRITON_INTERPRET=1, how a CPU runs this step in tests).
        from vllm_expertflow.kernels.fused_moe_uva import MAX_TOKENS, fused_moe_uva

        runtime, pool = self.runtime, self.runtime.pool
        num_tokens = x.shape[0]
        if num_tokens > MAX_TOKENS and not _is_capturing(x):
            pool.admit(self.layer_index, topk_ids.unique().tolist())
            start = time.perf_counter()
            pool.drain()
            runtime.stats.record_stall(self.layer_index, time.perf_counter() - start)
        else:
            runtime.routing_log.record(self.layer_index, topk_ids)
        host = runtime.store.layer_tensors(self.layer_index)
        row = pool.mirror.row(self.layer_index)
        chunks = [
            fused_moe_uva(
                x[start : start + MAX_TOKENS],
                topk_ids[start : start + MAX_TOKENS],
                topk_weights[start : start + MAX_TOKENS],
                row,
                pool.w13,
                pool.w2,
                host["w13"],
                host["w2"],
            )
            for start in range(0, num_tokens, MAX_TOKENS)
        ]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _run_kernel(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        experts: list[int],
        slots: list[int],
    ) -> torch.Tensor:
        """The stock kernel on the pool, expert ids remapped to slots; releases the slots."""
        pool = self.runtime.pool
        try:
            self._slot_of_expert[experts] = torch.tensor(
                slots, dtype=torch.int32, device=self._slot_of_expert.device
            )
            slot_ids = self._slot_of_expert[topk_ids.long()].to(topk_ids.dtype)
            return self.moe_kernel.apply(
                hidden_states=x,
                w1=pool.w13,
                w2=pool.w2,
                topk_weights=topk_weights,
                topk_ids=slot_ids,
                activation=layer.activation,
                apply_router_weight_on_input=layer.apply_router_weight_on_input,
                global_num_experts=pool.num_slots,
                expert_map=None,
            )
        finally:
            pool.release(slots)


def _is_capturing(x: torch.Tensor) -> bool:
    """True while vLLM captures a CUDA graph: the step must not sync with the host."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _moe_step(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str
) -> torch.Tensor:
    runner = get_forward_context().no_compile_layers[layer_name]
    experts = runner.routed_experts
    method = experts.quant_method
    output = method.run_step(experts, x, topk_weights, topk_ids)
    method.runtime.step_finished()
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
