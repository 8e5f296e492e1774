"""Patch: run ExpertFlow's per-step bookkeeping on the host before every model step.

Why:    the graph step's kernels only mark on the device which experts they used; the host must
        read the marks, book hits and load misses outside any CUDA graph, once per engine step
        (a captured graph replays without running our Python). Predictors that look at the
        previous token need to know which batch rows belong to which request. vLLM has no
        per-step host hook for MoE methods.
How:    wrap `execute_model` of vLLM's model runners (V1's `GPUModelRunner`, which the CPU
        runner inherits, and V2's) to call callbacks first, with the runner and the scheduler's
        output (which requests run, how many tokens each). Applied by every runtime in its
        worker process; idempotent.
Remove: when vLLM offers a per-step host hook to MoE methods.
Checked against: vLLM 0.32.0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

StepCallback = Callable[[Any, Any], None]
_callbacks: list[StepCallback] = []


def before_each_step(callback: StepCallback) -> None:
    """Calls `callback(runner, scheduler_output)` before each `execute_model` of any runner."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPUModelRunnerV2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for runner_cls in (GPUModelRunner, GPUModelRunnerV2):
        _wrap_execute_model(runner_cls)
    if callback not in _callbacks:
        _callbacks.append(callback)


def _wrap_execute_model(runner_cls: type) -> None:
    original = runner_cls.execute_model
    if getattr(original, "_expertflow_wrapped", False):
        return

    @functools.wraps(original)
    def execute_model(self, scheduler_output, *args, **kwargs):
        for callback in _callbacks:
            callback(self, scheduler_output)
        return original(self, scheduler_output, *args, **kwargs)

    execute_model._expertflow_wrapped = True
    runner_cls.execute_model = execute_model
