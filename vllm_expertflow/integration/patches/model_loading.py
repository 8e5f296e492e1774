"""Patch: open an ExpertFlow engine around each model load that selects the backend.

Why:    the MoE layers of one model must share one engine while vLLM builds them, and the
        engine's pool may only be allocated once every layer's experts are in the store, before
        vLLM measures memory for its KV cache. vLLM has no hook around a model load.
How:    wrap `BaseModelLoader.load_model` (the default, dummy and safetensors loaders use it):
        when the config selects `moe_backend="expertflow"`, install the MoE methods (only then is
        worker-side code imported), open the load's engine for the layers built inside it, and
        build its pool after vLLM's own weight processing; an `expertflow:` error of the load is
        also reported to the caller (`startup_errors`). Other backends pass straight through.
Remove: when vLLM offers MoE methods a per-model setup and a post-load hook.
Checked against: vLLM 0.32.0.
"""

from __future__ import annotations

from . import BACKEND_NAME, wrap_once


def apply() -> None:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    wrap_once(BaseModelLoader, "load_model", _with_offloading)


def _with_offloading(original):
    def load_model(self, vllm_config, model_config, prefix: str = ""):
        if vllm_config.kernel_config.moe_backend != BACKEND_NAME:
            return original(self, vllm_config, model_config, prefix)
        from vllm_expertflow.core.config import ExpertFlowConfigError

        from .. import engine_hooks, startup_errors
        from . import fused_moe_methods, model_runner

        fused_moe_methods.apply()
        model_runner.apply()
        try:
            with engine_hooks.open_model_load(vllm_config, model_config) as offloaded:
                model = original(self, vllm_config, model_config, prefix)
            engine_hooks.finish_loading(offloaded, model)
        except ExpertFlowConfigError as error:
            startup_errors.report(error)  # the caller raises this line (patches/startup_errors)
            raise
        return model

    return load_model
