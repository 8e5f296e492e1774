"""Patch: accept `expertflow` as a value of vLLM's `moe_backend` option, checked where it is set.

Why:    `KernelConfig.moe_backend` (and `SpeculativeConfig.moe_backend`) is a pydantic
        `Literal` of built-in backends, so `--moe-backend expertflow` and
        `LLM(moe_backend="expertflow")` are rejected before any plugin code runs. And an option
        or model the backend cannot serve should fail in the caller's process with one line,
        not deep inside an engine process.
How:    extend the field's `Literal` with our name, rebuild the two pydantic dataclasses, and
        clear `engine.arg_utils._compute_kwargs`'s cache so the CLI choices are recomputed.
        Wrap `VllmConfig.__post_init__` to run `support.check` when the backend is selected
        and to install ExpertFlow's worker extension (stats, reconfigure, tracing over
        `collective_rpc`) when no other one is configured.
Remove: when vLLM accepts out-of-tree MoE backends by name (no upstream PR yet).
Checked against: vLLM 0.32.0.
"""

from __future__ import annotations

import typing

from . import BACKEND_NAME

WORKER_EXTENSION = "vllm_expertflow.integration.worker_extension.ExpertFlowWorkerExtension"


def is_applied() -> bool:
    from vllm.config.kernel import KernelConfig

    return BACKEND_NAME in typing.get_args(KernelConfig.__dataclass_fields__["moe_backend"].type)


def apply() -> None:
    from vllm.config.kernel import KernelConfig, MoEBackend
    from vllm.config.speculative import SpeculativeConfig
    from vllm.engine import arg_utils

    if is_applied():
        return
    extended = typing.Literal[(*typing.get_args(MoEBackend), BACKEND_NAME)]
    _set_field_type(KernelConfig, extended)
    _set_field_type(SpeculativeConfig, extended | None)
    arg_utils._compute_kwargs.cache_clear()
    _check_where_the_config_is_built()


def _set_field_type(config_cls: type, field_type: object) -> None:
    from pydantic.dataclasses import rebuild_dataclass

    config_cls.__annotations__["moe_backend"] = field_type
    config_cls.__dataclass_fields__["moe_backend"].type = field_type
    rebuild_dataclass(config_cls, force=True)


def _check_where_the_config_is_built() -> None:
    from vllm.config import VllmConfig
    from vllm.logger import init_logger

    from ..support import check

    original = VllmConfig.__post_init__

    def post_init_with_expertflow_check(self: VllmConfig) -> None:
        original(self)
        if self.kernel_config.moe_backend != BACKEND_NAME:
            return
        check(self)
        if not self.parallel_config.worker_extension_cls:
            self.parallel_config.worker_extension_cls = WORKER_EXTENSION
        elif self.parallel_config.worker_extension_cls != WORKER_EXTENSION:
            init_logger(__name__).warning(
                "expertflow: worker_extension_cls is set to %s, so vllm_expertflow.get_stats "
                "and reconfigure are unavailable",
                self.parallel_config.worker_extension_cls,
            )

    VllmConfig.__post_init__ = post_init_with_expertflow_check
