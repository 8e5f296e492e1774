"""Patch: an ExpertFlow error found while an engine starts is the error its caller sees.

Why:    errors only a worker can find (a store write that fails) end vLLM's start-up in the
        caller with "Engine core initialization failed. See root cause above.", the real line
        a hundred traceback lines up in the log.
How:    the worker leaves the line of its failure for the top process (`startup_errors.report`,
        from the model-loading patch); wrap `vllm.v1.engine.utils.wait_for_engine_startup`, the
        caller's wait for its engine cores, so that when it fails and a worker reported since it
        began, that line is raised as `ExpertFlowConfigError`. vLLM shuts the engine down as for
        its own error, and its log of the failure stays above.
Remove: when vLLM carries a worker's exception to the caller.
Checked against: vLLM 0.32.0.
"""

from __future__ import annotations

import time

from . import wrap_once


def apply() -> None:
    from vllm.v1.engine import utils

    wrap_once(utils, "wait_for_engine_startup", _raising_reported_errors)


def _raising_reported_errors(original):
    def wait_for_engine_startup(*args, **kwargs):
        from vllm_expertflow.core.config import ExpertFlowConfigError

        from ..startup_errors import take_reported

        started = time.time()
        try:
            return original(*args, **kwargs)
        except RuntimeError:
            reported = take_reported(since=started)
            if reported:
                raise ExpertFlowConfigError(reported[0]) from None
            raise

    return wait_for_engine_startup
