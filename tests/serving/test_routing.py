"""Replica-choice policies and the residency estimate, without Ray or an engine."""

from vllm_expertflow.serving.routing import (
    ExpertAffinity,
    ReplicaView,
    RoundRobin,
    RoutingHistory,
)

SHAKESPEARE = {(0, 1): 0.5, (1, 2): 0.5}
PYDOC = {(0, 7): 0.5, (1, 9): 0.5}


def views(*in_flight: int, resident: tuple = ()) -> list[ReplicaView]:
    sets = list(resident) + [frozenset()] * (len(in_flight) - len(resident))
    return [ReplicaView(i, load, frozenset(sets[i])) for i, load in enumerate(in_flight)]


def test_round_robin_cycles_in_index_order():
    policy = RoundRobin()
    assert [policy.choose(views(0, 0, 0), None) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_round_robin_skips_replicas_left_out():
    policy = RoundRobin()
    healthy = [ReplicaView(0, 0), ReplicaView(2, 0)]
    assert {policy.choose(healthy, None) for _ in range(4)} == {0, 2}


def test_affinity_prefers_the_replica_holding_the_prompts_experts():
    policy = ExpertAffinity()
    replicas = views(0, 0, resident=(PYDOC.keys(), SHAKESPEARE.keys()))
    for _ in range(3):  # not a tie broken by turn: always the same replica
        assert policy.choose(replicas, SHAKESPEARE) == 1
        assert policy.choose(replicas, PYDOC) == 0


def test_affinity_partial_overlap_ranks_by_demand_share():
    demand = {(0, 1): 0.7, (0, 2): 0.3}
    replicas = views(0, 0, resident=({(0, 2)}, {(0, 1)}))
    assert ExpertAffinity().choose(replicas, demand) == 1


def test_affinity_load_breaks_ties():
    policy = ExpertAffinity()
    both = SHAKESPEARE.keys()
    assert policy.choose(views(3, 1, resident=(both, both)), SHAKESPEARE) == 1
    assert policy.choose(views(2, 5, 2), None) in (0, 2)


def test_affinity_load_overrides_a_small_overlap_gain():
    policy = ExpertAffinity(load_penalty=0.25)
    half = {(0, 1)}  # 0.5 of the demand
    # Replica 0 holds half of the demand but has 3 more requests in flight: 0.5 - 0.75 < 0.
    assert policy.choose(views(3, 0, resident=(half,)), SHAKESPEARE) == 1
    # One more request in flight costs only 0.25: the overlap wins.
    assert policy.choose(views(1, 0, resident=(half,)), SHAKESPEARE) == 0


def test_affinity_without_signal_rotates():
    policy = ExpertAffinity()
    assert [policy.choose(views(0, 0), {}) for _ in range(4)] == [0, 1, 0, 1]


def test_routing_history_keeps_the_heaviest_recent_experts():
    history = RoutingHistory(window=2)
    history.record(0, SHAKESPEARE)
    history.record(0, {(0, 1): 1.0})
    assert history.resident(0, slots=1) == {(0, 1)}
    assert history.resident(0, slots=8) == set(SHAKESPEARE)
    history.record(0, PYDOC)
    history.record(0, PYDOC)  # the window forgets the Shakespeare prompts
    assert history.resident(0, slots=8) == set(PYDOC)
    assert history.resident(1, slots=8) == frozenset()
