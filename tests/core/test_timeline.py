"""The plan's clock on hand-made layer-steps: exact stall arithmetic."""

import pytest

from vllm_expertflow.core.timeline import (
    Hardware,
    LayerCost,
    LayerStep,
    Link,
    compute_seconds,
    simulate,
)

# 1 GB/s and no latency: a 1 MB expert loads in 1 ms. Memory 1 GB/s: 1 MB read = 1 ms compute.
HARDWARE = Hardware("test", 1.0, 0.0, 1, 1.0, 1e6, 80.0)
COST = LayerCost(resident_bytes=0, expert_bytes=10**6, flops_per_token=1.0)
MS = 1e-3
LOAD = HARDWARE.load_seconds(COST.expert_bytes)
LINK = Link.independent(LOAD)  # one queue


def on_hardware(step: LayerStep) -> float:
    return compute_seconds(COST, HARDWARE, step.tokens, step.experts_run)


def test_demand_loads_stall_the_layer_for_their_whole_transfer():
    # One layer, two experts run, both missed: 2 ms of loads, then 2 ms of compute.
    result = simulate([[LayerStep(0, tokens=1, experts_run=2, demand_loads=2)]], on_hardware, LINK)
    assert result.stall_seconds == pytest.approx(2 * MS)
    assert result.seconds == pytest.approx(4 * MS)
    assert result.tokens_per_s == pytest.approx(250.0)
    assert result.loads == 2 and result.stall_share == pytest.approx(0.5)


def test_a_prefetch_hidden_behind_compute_costs_nothing_and_a_late_one_stalls_the_rest():
    # Layer 0 runs 2 resident experts (2 ms) and prefetches one expert of layer 1 (1 ms): hidden.
    hidden = [[LayerStep(0, 1, 2, 0, [1]), LayerStep(1, 1, 1, 0)]]
    result = simulate(hidden, on_hardware, LINK)
    assert result.stall_seconds == 0 and result.seconds == pytest.approx(3 * MS)
    # Three prefetches (3 ms) behind 2 ms of compute: layer 1 waits 1 ms.
    late = [[LayerStep(0, 1, 2, 0, [1, 1, 1]), LayerStep(1, 1, 1, 0)]]
    result = simulate(late, on_hardware, LINK)
    assert result.stall_seconds == pytest.approx(1 * MS)
    assert result.seconds == pytest.approx(4 * MS)


def test_demand_loads_queue_behind_prefetches_in_flight():
    # Layer 0 (1 ms compute) prefetches 3 experts of layer 2 (until 3 ms); layer 1 then misses
    # one expert: its load waits for the link (lands at 4 ms), so layer 1 stalls 3 ms.
    forward = [LayerStep(0, 1, 1, 0, [2, 2, 2]), LayerStep(1, 1, 1, 1), LayerStep(2, 1, 1, 0)]
    result = simulate([forward], on_hardware, LINK)
    assert result.stall_seconds == pytest.approx(3 * MS)
    assert result.seconds == pytest.approx(6 * MS)  # layer 1: 4-5 ms, layer 2: 5-6 ms


def test_cpu_demand_readers_do_not_wait_behind_prefetches_and_load_a_few_at_once():
    # The same forward on the CPU pool's link: layer 1's miss loads on a demand reader at once
    # (1 ms stall, not 3) while the prefetches use the I/O thread; the last of them lands at
    # 3 ms, as layer 1 ends, so layer 2 does not wait.
    forward = [LayerStep(0, 1, 1, 0, [2, 2, 2]), LayerStep(1, 1, 1, 1), LayerStep(2, 1, 1, 0)]
    result = simulate([forward], on_hardware, Link.independent(LOAD, demand_readers=2))
    assert result.stall_seconds == pytest.approx(1 * MS)
    assert result.seconds == pytest.approx(4 * MS)
    # Five misses on two readers: three rounds of loads, 3 ms, then 5 ms of compute.
    five = [[LayerStep(0, tokens=1, experts_run=5, demand_loads=5)]]
    result = simulate(five, on_hardware, Link.independent(LOAD, demand_readers=2))
    assert result.stall_seconds == pytest.approx(3 * MS)
    # Two I/O threads land two prefetches together: the next layer waits 1 ms, not 2.
    two = [[LayerStep(0, 1, 0, 0, [1, 1]), LayerStep(1, 1, 1, 0)]]
    assert simulate(two, on_hardware, LINK).stall_seconds == pytest.approx(2 * MS)
    result = simulate(two, on_hardware, Link.independent(LOAD, prefetch_queues=2))
    assert result.stall_seconds == pytest.approx(1 * MS)


def test_a_predictor_of_the_layers_output_prefetches_only_once_it_has_computed():
    # Layer 0 computes 2 ms; its one prefetch for layer 1 (1 ms) is hidden if issued at the
    # start, and stalls layer 1 for the whole load if issued at the end.
    forward = [[LayerStep(0, 1, 2, 0, [1]), LayerStep(1, 1, 1, 0)]]
    assert simulate(forward, on_hardware, LINK).stall_seconds == 0
    late = simulate(forward, on_hardware, LINK, prefetch_after_compute=True)
    assert late.stall_seconds == pytest.approx(1 * MS)
    # With 1 ms of attention before layer 1's MoE step, the late load lands in time.
    led = simulate(forward, on_hardware, LINK, prefetch_after_compute=True, lead_seconds=MS)
    assert led.stall_seconds == 0 and led.seconds == pytest.approx(5 * MS)


def test_latency_is_shared_by_parallel_transfers():
    hardware = Hardware("test", 1.0, 1000.0, 4, 1.0, 1e6, 80.0)
    assert hardware.load_seconds(10**6) == pytest.approx(1 * MS + 0.25 * MS)


def test_loads_in_flight_share_one_store():
    # A store that moves 1 load per ms alone and 1 per 0.75 ms with two or more in flight
    # (a disk): two loads at once land together after 1.5 ms, not 1 ms.
    disk = Link((MS, 0.75 * MS), demand_readers=2)
    five = [[LayerStep(0, tokens=1, experts_run=5, demand_loads=5)]]
    # Two pairs (1.5 ms each), then the fifth alone (1 ms); independent readers: 3 ms.
    assert simulate(five, on_hardware, disk).stall_seconds == pytest.approx(4 * MS)
    # Layer 0 (1 ms) prefetches 3 experts of layer 2; the first lands alone at 1 ms. Layer 1's
    # miss then shares the store with the second prefetch: both land at 2.5 ms (a 1.5 ms
    # stall); the third lands alone at 3.5 ms, as layer 1 ends, so layer 2 does not wait.
    forward = [LayerStep(0, 1, 1, 0, [2, 2, 2]), LayerStep(1, 1, 1, 1), LayerStep(2, 1, 1, 0)]
    result = simulate([forward], on_hardware, disk)
    assert result.stall_seconds == pytest.approx(1.5 * MS)
    assert result.seconds == pytest.approx(4.5 * MS)


def test_prefetches_over_the_budget_load_on_demand_at_their_layer():
    # Layer 0 (2 ms) prefetches 3 experts of layer 1. Unbudgeted they land at 1, 2 and 3 ms:
    # layer 1 waits 1 ms. With one prefetch in flight at most, only the first is issued; layer
    # 1 misses the other two and loads them on demand, landing at 3 and 4 ms: a 2 ms wait.
    forward = [[LayerStep(0, 1, 2, 0, [1, 1, 1]), LayerStep(1, 1, 3, 0)]]
    free = simulate(forward, on_hardware, LINK)
    assert free.stall_seconds == pytest.approx(1 * MS) and free.seconds == pytest.approx(6 * MS)
    budgeted = simulate(forward, on_hardware, LINK, prefetch_budget=1)
    assert budgeted.stall_seconds == pytest.approx(2 * MS)
    assert budgeted.seconds == pytest.approx(7 * MS) and budgeted.loads == 3
