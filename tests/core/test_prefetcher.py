import torch

from vllm_expertflow.core.policy import make_policy
from vllm_expertflow.core.pool import ExpertPool
from vllm_expertflow.core.predictor import GatePredictor
from vllm_expertflow.core.prefetcher import Prefetcher
from vllm_expertflow.core.stats import OffloadStats
from vllm_expertflow.core.store import RamStore

NUM_EXPERTS, HIDDEN, LAYERS = 8, 16, (0, 1, 2)


def make_pool(num_slots: int, policy: str = "lru") -> ExpertPool:
    store = RamStore(NUM_EXPERTS, pin_memory=False)
    for layer in LAYERS:
        store.write_layer(
            layer, {"w13": torch.randn(NUM_EXPERTS, 8, 4), "w2": torch.randn(NUM_EXPERTS, 4, 4)}
        )
    return ExpertPool(
        store,
        num_slots,
        torch.device("cpu"),
        LAYERS,
        make_policy(policy, num_slots, len(LAYERS)),
        OffloadStats(),
    )


def one_hot_gates() -> dict[int, torch.Tensor]:
    """Gates under which expert e of every layer is chosen by hidden direction e."""
    return {layer: torch.eye(NUM_EXPERTS, HIDDEN) for layer in LAYERS}


def test_prefetched_experts_are_hits_at_the_next_layer():
    pool = make_pool(8, "predictive")
    prefetcher = Prefetcher(pool, GatePredictor(one_hot_gates()), depth=1, top_k=2)
    hidden = torch.zeros(1, HIDDEN)
    hidden[0, 3], hidden[0, 5] = 2.0, 1.0
    slots = pool.ensure_resident(0, [3, 5])
    prefetcher.after_routing(0, hidden, torch.tensor([[3, 5]]))
    pool.release(slots)
    next_slots = pool.ensure_resident(1, [3, 5])
    pool.release(next_slots)
    stats = pool.stats.layer(1)
    assert (stats.hits, stats.misses, stats.prefetches_used) == (2, 0, 2)
    assert pool.stats.layer(0).misses == 2


def test_prefetch_never_evicts_the_current_steps_experts():
    pool = make_pool(2)
    prefetcher = Prefetcher(pool, GatePredictor(one_hot_gates()), depth=1, top_k=2)
    slots = pool.ensure_resident(0, [0, 1])  # every slot pinned by the step
    hidden = torch.zeros(1, HIDDEN)
    hidden[0, 6] = 1.0
    prefetcher.after_routing(0, hidden, torch.tensor([[0, 1]]))
    assert pool.table.lookup((0, 0)) == slots[0] and pool.table.lookup((0, 1)) == slots[1]
    assert pool.stats.layer(1).prefetches_issued == 0
    pool.release(slots)


def test_evicted_unused_prefetch_counts_as_waste():
    pool = make_pool(2)
    assert pool.prefetch(1, 4) and pool.prefetch(1, 5)
    pool.drain()
    pool.release(pool.ensure_resident(2, [0, 1]))  # evicts both prefetches unused
    total = pool.stats.total()
    assert (total.prefetches_issued, total.prefetches_used, total.prefetches_wasted) == (2, 0, 2)


def test_a_step_waits_for_in_flight_loads_when_the_pool_is_full():
    pool = make_pool(2)
    assert pool.prefetch(1, 4) and pool.prefetch(1, 5)  # both slots pinned while in flight
    slots = pool.ensure_resident(0, [0, 1])
    assert sorted(slots) == [0, 1]
    pool.release(slots)


def test_loads_still_in_flight_count_against_the_next_layers_budget():
    import threading

    gate = threading.Event()

    class SlowStore(RamStore):
        def read_expert(self, layer, expert):
            gate.wait()
            return super().read_expert(layer, expert)

    store = SlowStore(NUM_EXPERTS, pin_memory=False)
    for layer in LAYERS:
        store.write_layer(
            layer, {"w13": torch.randn(NUM_EXPERTS, 8, 4), "w2": torch.randn(NUM_EXPERTS, 4, 4)}
        )
    policy = make_policy("lru", 8, len(LAYERS))
    pool = ExpertPool(store, 8, torch.device("cpu"), LAYERS, policy, OffloadStats())
    # Nothing measured yet: the budget is top_k loads per layer.
    prefetcher = Prefetcher(pool, GatePredictor(one_hot_gates(), 2), depth=2, top_k=2)
    hidden = torch.zeros(1, HIDDEN)
    hidden[0, 3], hidden[0, 5] = 2.0, 1.0
    prefetcher.after_routing(0, hidden, torch.tensor([[3, 5]]))
    assert pool.loads_in_flight == 2
    prefetcher.after_routing(1, hidden, torch.tensor([[3, 5]]))  # the link has no slack
    assert sum(pool.stats.layer(layer).prefetches_issued for layer in LAYERS) == 2
    gate.set()
    pool.drain()
    assert pool.loads_in_flight == 0
    prefetcher.after_routing(1, hidden, torch.tensor([[3, 5]]))
    assert sum(pool.stats.layer(layer).prefetches_issued for layer in LAYERS) > 2
    pool.close()
