"""Which replica serves a request.

Policies see a `ReplicaView` per replica that is currently healthy and return the index of
the chosen one. They never fail: with no signal to go on they fall back to the least loaded.

Expert affinity. A prompt's *demand* is a weight per `(layer, expert)`: how much of the
prompt's predicted routing falls on that expert (weights sum to 1; see `prediction`). Each
replica has a *resident* set, the `(layer, expert)` pairs its expert pool holds. The score of
replica `r` is

    score(r) = overlap(r) - load_penalty * (in_flight(r) - min over replicas of in_flight)

where `overlap(r)` is the demand weight resident on `r` (0..1, the share of the prompt's
predicted expert lookups that would hit) and `in_flight` counts requests dispatched to the
replica and not yet answered. The highest score wins; ties go to the fewer in-flight requests,
then round-robin order. With the default penalty of 0.25 a replica one request busier than
another must hit 25 points of demand more to win, and a full overlap (1.0) never outweighs
four extra requests in flight, so a hot replica cannot starve the others.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass

ExpertKey = tuple[int, int]  # (layer, expert)
Demand = dict[ExpertKey, float]


@dataclass(frozen=True)
class ReplicaView:
    index: int
    in_flight: int
    resident: frozenset[ExpertKey] = frozenset()


class RoutingPolicy(ABC):
    name: str

    @abstractmethod
    def choose(self, replicas: list[ReplicaView], demand: Demand | None) -> int:
        """The `index` of the replica to send a request with this demand to."""


class RoundRobin(RoutingPolicy):
    name = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, replicas: list[ReplicaView], demand: Demand | None) -> int:
        return _rotate(replicas, next(self._counter))[0].index


class ExpertAffinity(RoutingPolicy):
    name = "expert-affinity"

    def __init__(self, load_penalty: float = 0.25) -> None:
        self.load_penalty = load_penalty
        self._counter = itertools.count()

    def score(self, replica: ReplicaView, demand: Demand, min_in_flight: int) -> float:
        overlap = sum(weight for key, weight in demand.items() if key in replica.resident)
        return overlap - self.load_penalty * (replica.in_flight - min_in_flight)

    def choose(self, replicas: list[ReplicaView], demand: Demand | None) -> int:
        # Rotating first makes `max` (which keeps the first of equals) break full ties in turn.
        ordered = _rotate(replicas, next(self._counter))
        least = min(r.in_flight for r in replicas)
        demand = demand or {}
        best = max(ordered, key=lambda r: (round(self.score(r, demand, least), 9), -r.in_flight))
        return best.index


def _rotate(replicas: list[ReplicaView], turn: int) -> list[ReplicaView]:
    ordered = sorted(replicas, key=lambda r: r.index)
    start = turn % len(ordered)
    return ordered[start:] + ordered[:start]


POLICIES = {policy.name: policy for policy in (RoundRobin, ExpertAffinity)}


def make_policy(name: str) -> RoutingPolicy:
    return POLICIES[name]()


class RoutingHistory:
    """Stand-in for a replica's resident experts: what the prompts it served recently want.

    The workers' stats snapshots carry only the number of resident slots, not which experts
    fill them. An expert pool under LRU-like eviction holds roughly the experts the recent
    requests used most, so the estimate is the `slots` heaviest keys of the summed demand of
    the last `window` requests dispatched to the replica.
    """

    def __init__(self, window: int = 16) -> None:
        self.window = window
        self._recent: dict[int, list[Demand]] = {}

    def record(self, replica: int, demand: Demand) -> None:
        recent = self._recent.setdefault(replica, [])
        recent.append(demand)
        del recent[: -self.window]

    def resident(self, replica: int, slots: int | None) -> frozenset[ExpertKey]:
        """`slots` is None before the replica's first snapshot: then no cap."""
        totals: dict[ExpertKey, float] = {}
        for demand in self._recent.get(replica, []):
            for key, weight in demand.items():
                totals[key] = totals.get(key, 0.0) + weight
        heaviest = sorted(totals, key=totals.__getitem__, reverse=True)
        return frozenset(heaviest[:slots])
