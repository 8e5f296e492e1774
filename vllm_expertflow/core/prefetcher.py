"""Prefetching the experts later layers are predicted to need while the current layer computes.

At MoE layer L the predictor scores the experts of layers L+1..L+depth for the batch; the
likeliest are queued as background loads (once layer L has routed, or once it has computed for
predictors that read its output and the previous token's), as many per layer as the link can
move in one layer's compute time (both measured while serving). The predictive eviction
policy, when in use, learns from the same scores which resident experts are needed soonest.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .policy import EvictionPolicy, PredictivePolicy
from .pool import ExpertPool
from .predictor import ExpertPredictor
from .stats import running_mean

# context_of(layer, router_input, moe_output) -> a predictor's `context_inputs` for the batch.
ContextSource = Callable[[int, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def loads_hidden_per_layer(layer_seconds: float, load_seconds: float) -> int:
    """The prefetches one layer may queue: the loads its time hides. At least one: on a link
    slower than a layer's compute a prefetch cannot be hidden, but the one likeliest expert
    still beats a certain stall."""
    return max(1, int(layer_seconds / load_seconds))


class LinkBudget:
    """How many expert loads fit in one layer's compute time, from running means."""

    def __init__(self) -> None:
        self.layer_seconds: float | None = None
        self._last_layer_start: float | None = None

    def layer_started(self) -> None:
        now = time.perf_counter()
        if self._last_layer_start is not None:
            self.layer_seconds = running_mean(self.layer_seconds, now - self._last_layer_start)
        self._last_layer_start = now

    def experts_per_layer(self, load_seconds: float | None, first_guess: int) -> int:
        if self.layer_seconds is None or not load_seconds:
            return first_guess  # nothing measured yet
        return loads_hidden_per_layer(self.layer_seconds, load_seconds)


class Prefetcher:
    def __init__(
        self,
        pool: ExpertPool,
        predictor: ExpertPredictor,
        depth: int,
        top_k: int,
        context_of: ContextSource | None = None,
        loads_per_layer: int | None = None,
    ) -> None:
        """`context_of` is required by predictors with `context_inputs`; `loads_per_layer`
        fixes the link budget (the offline replay's link is free) instead of measuring it."""
        assert context_of is not None or not predictor.context_inputs, "context_of is missing"
        self.pool = pool
        self.predictor = predictor
        self.context_of = context_of
        self.depth = min(depth, predictor.max_depth)
        self.top_k = top_k
        self.budget = LinkBudget()
        self.loads_per_layer = loads_per_layer
        policy: EvictionPolicy = pool.policy
        self._predictive = policy if isinstance(policy, PredictivePolicy) else None

    def after_routing(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """Layer `layer`'s experts are pinned: predictors of its router input prefetch now."""
        if not self.predictor.context_inputs:
            self._prefetch(layer, hidden, topk_ids, None)

    def after_compute(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, output: torch.Tensor
    ) -> None:
        """Layer `layer`'s output exists: predictors that read it prefetch now."""
        if self.predictor.context_inputs:
            self._prefetch(layer, hidden, topk_ids, self.context_of(layer, hidden, output))

    def _prefetch(
        self,
        layer: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        context: dict[str, torch.Tensor] | None,
    ) -> None:
        """Queues loads for the layers after `layer`, likeliest first, within the link budget."""
        started = time.perf_counter()
        self.budget.layer_started()
        if self._predictive is not None:
            self._predictive.clear_predictions(layer)
        # Loads still queued from earlier layers count against the link's budget: a link that
        # cannot keep up gets no more prefetches until it has slack.
        remaining = (
            self.loads_per_layer
            or self.budget.experts_per_layer(self.pool.mean_load_seconds, self.top_k)
        ) - self.pool.loads_in_flight
        targets = []
        for depth in range(1, self.depth + 1):
            target = self.predictor.target_layer(layer, depth)
            if target is None:
                break
            if self.pool.table.num_resident_in(target) == self.pool.store.num_experts:
                continue  # nothing to fetch: spare the predictor's cost
            targets.append((depth, target))
        depths = [depth for depth, _ in targets]
        rankings = (
            self.predictor.ranked_depths(layer, depths, hidden, topk_ids, self.top_k, context)
            if targets
            else []
        )
        for (_, target), ranked in zip(targets, rankings, strict=True):
            for expert, votes in ranked:
                if self._predictive is not None:
                    self._predictive.predict((target, expert), votes)
                if remaining > 0 and self.pool.prefetch(target, expert):
                    remaining -= 1
        self.pool.stats.record_predict(layer, time.perf_counter() - started)
