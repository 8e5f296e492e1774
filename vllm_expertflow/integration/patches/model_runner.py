"""Patch: run ExpertFlow's per-forward bookkeeping on the host before every model forward.

Why:    the graph step's kernels only mark on the device which experts they used; the host must
        read the marks, book hits and load misses outside any CUDA graph, once per forward (a
        captured graph replays without running our Python). Predictors that look at the
        previous token need to know which batch rows belong to which request. vLLM has no
        per-forward host hook for MoE methods.
How:    wrap `execute_model` of vLLM's model runners (V1's `GPUModelRunner`, which the CPU
        runner inherits, and V2's) to call `engine_hooks.before_forward` first, with the runner
        and the scheduler's output. Runners without offloaded layers pass straight through.
Remove: when vLLM offers a per-forward host hook to MoE methods.
Checked against: vLLM 0.32.0.
"""

from __future__ import annotations

from . import wrap_once


def apply() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPUModelRunnerV2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for runner_cls in (GPUModelRunner, GPUModelRunnerV2):
        wrap_once(runner_cls, "execute_model", _with_bookkeeping)


def _with_bookkeeping(original):
    from ..engine_hooks import before_forward

    def execute_model(self, scheduler_output, *args, **kwargs):
        before_forward(self, scheduler_output)
        return original(self, scheduler_output, *args, **kwargs)

    return execute_model
