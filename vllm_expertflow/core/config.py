"""User-facing options of the offloading backend, validated once at start-up."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from .policy import POLICIES

STORES = ("ram", "disk")
PREDICTORS = ("none", "gate")
# host: the host books every lookup and loads misses before the kernel (waits on a miss).
# graph: a miss is read from the pinned host store inside the kernel; the host books lookups
# and loads misses between steps, so a decode step has no host sync and fits a CUDA graph.
STEPS = ("auto", "host", "graph")
# What an int4 checkpoint's slots hold. bf16: each load is expanded into the kernel's layout
# (a slot costs a bf16 expert). packed: the records as stored, ~3.7x the experts per byte, and
# each kernel call's experts are expanded into a small scratch right before it.
INT4_SLOTS = ("bf16", "packed")
DEFAULT_CACHE_FRACTION = 0.5
DEFAULT_STORE_DIR = os.path.join("~", ".cache", "vllm-expertflow", "stores")


class ExpertFlowConfigError(ValueError):
    """A bad `additional_config["expertflow"]` entry; the message names the fix."""


@dataclass(frozen=True)
class ExpertFlowConfig:
    cache_fraction: float | None = None
    cache_experts: int | None = None
    cache_bytes: int | None = None
    store: str = "ram"
    store_dir: str = DEFAULT_STORE_DIR
    policy: str = "lru"
    predictor: str = "none"
    prefetch_depth: int = 1
    link_gbps: float | None = None
    static_experts: str | None = None
    step: str = "auto"
    int4_slots: str = "bf16"

    def __post_init__(self) -> None:
        sizes = [self.cache_fraction, self.cache_experts, self.cache_bytes]
        if sum(size is not None for size in sizes) > 1:
            raise ExpertFlowConfigError(
                "expertflow: give one of cache_fraction, cache_experts or cache_bytes, not several"
            )
        if self.cache_fraction is not None and not (
            isinstance(self.cache_fraction, int | float)
            and not isinstance(self.cache_fraction, bool)
            and 0.0 < self.cache_fraction <= 1.0
        ):
            raise ExpertFlowConfigError(
                f"expertflow: cache_fraction={self.cache_fraction!r} is invalid; "
                "use a number in (0, 1], the share of routed experts kept resident"
            )
        if self.cache_experts is not None and not _is_positive_int(self.cache_experts):
            raise ExpertFlowConfigError(
                f"expertflow: cache_experts={self.cache_experts!r} is invalid; "
                "use a positive integer number of expert slots"
            )
        if self.cache_bytes is not None and not _is_positive_int(self.cache_bytes):
            raise ExpertFlowConfigError(
                f"expertflow: cache_bytes={self.cache_bytes!r} is invalid; "
                "use a positive integer number of bytes for the expert pool"
            )
        _check_choice("store", self.store, STORES)
        _check_choice("policy", self.policy, tuple(POLICIES))
        _check_choice("step", self.step, STEPS)
        _check_choice("int4_slots", self.int4_slots, INT4_SLOTS)
        if not isinstance(self.predictor, str) or not (
            self.predictor in PREDICTORS or self.predictor.endswith(".safetensors")
        ):
            raise ExpertFlowConfigError(
                f"expertflow: predictor={self.predictor!r} is invalid; use none, gate, or the "
                "path of a .safetensors file written by `vllm-expertflow train-predictor`"
            )
        if self.policy == "predictive" and self.predictor == "none":
            raise ExpertFlowConfigError(
                "expertflow: policy=predictive needs a predictor; set predictor to gate or a file"
            )
        if not (isinstance(self.prefetch_depth, int) and 1 <= self.prefetch_depth <= 4):
            raise ExpertFlowConfigError(
                f"expertflow: prefetch_depth={self.prefetch_depth!r} is invalid; use 1 to 4"
            )
        if self.link_gbps is not None and not (
            isinstance(self.link_gbps, int | float) and self.link_gbps > 0
        ):
            raise ExpertFlowConfigError(
                f"expertflow: link_gbps={self.link_gbps!r} is invalid; use a positive number of "
                "GB/s to emulate a slower link (benchmarks only), or leave it unset"
            )
        if (self.policy == "static") != (self.static_experts is not None):
            raise ExpertFlowConfigError(
                "expertflow: policy=static and static_experts go together; static_experts is a "
                "JSON file of [layer, expert] pairs, hottest first (bench writes one)"
            )
        if self.step == "graph" and (self.store != "ram" or self.predictor != "none"):
            raise ExpertFlowConfigError(
                "expertflow: step=graph reads misses from pinned host memory and loads them "
                "between steps, so it needs store=ram and predictor=none; use step=host otherwise"
            )
        if not isinstance(self.store_dir, str) or not self.store_dir:
            raise ExpertFlowConfigError(
                f"expertflow: store_dir={self.store_dir!r} is invalid; use a directory path"
            )

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> ExpertFlowConfig:
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ExpertFlowConfigError(
                f"expertflow: unknown option(s) {', '.join(unknown)}; "
                f"valid options are {', '.join(valid)}"
            )
        return cls(**options)

    def num_slots(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        slot_bytes: int,
        reserved_bytes: int = 0,
    ) -> int:
        """Slots in the shared pool; refuses a pool that cannot hold one token's experts.

        `reserved_bytes`: memory beside the slots that `cache_bytes` must also cover (the
        decode scratch of a pool that keeps packed records)."""
        total = num_layers * num_experts
        if self.cache_experts is not None:
            slots = self.cache_experts
        elif self.cache_bytes is not None:
            slots = max(0, self.cache_bytes - reserved_bytes) // slot_bytes
        else:
            fraction = (
                DEFAULT_CACHE_FRACTION if self.cache_fraction is None else self.cache_fraction
            )
            slots = max(top_k, math.ceil(fraction * total))
        if slots < top_k:
            raise ExpertFlowConfigError(
                f"expertflow: a cache of {slots} expert slots is smaller than the model's "
                f"top-k of {top_k}; use cache_experts >= {top_k} "
                f"(or cache_bytes >= {top_k * slot_bytes + reserved_bytes})"
            )
        return min(slots, total)

    def resolved_step(self, device_type: str, quantized: bool, biased: bool = False) -> str:
        """`host` or `graph`; `auto` takes the graph step wherever it can run.

        `quantized`: int4 experts; `biased`: experts with biases (the graph kernel has none)."""
        if self.step == "auto":
            graph_ok = self.store == "ram" and self.predictor == "none"
            graph_ok = graph_ok and not quantized and not biased
            return "graph" if device_type == "cuda" and graph_ok else "host"
        if self.step == "graph" and (quantized or biased):
            raise ExpertFlowConfigError(
                "expertflow: step=graph reads bf16 experts without biases from host memory in "
                f"its kernel; {'quantized' if quantized else 'biased'} experts need step=host"
            )
        if self.step == "graph" and device_type != "cuda" and not _triton_interprets():
            raise ExpertFlowConfigError(
                "expertflow: step=graph runs Triton kernels, which on a CPU only run in Triton's "
                "interpreter (TRITON_INTERPRET=1, for tests); use step=host on a CPU"
            )
        return self.step

    @property
    def resolved_store_dir(self) -> str:
        return os.path.abspath(os.path.expanduser(self.store_dir))


def _triton_interprets() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _is_positive_int(value: object) -> bool:
    # bool is an int subclass, but `True` slots or bytes is a typo, not a size.
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ExpertFlowConfigError(
            f"expertflow: {name}={value!r} is invalid; valid values are {', '.join(choices)}"
        )
