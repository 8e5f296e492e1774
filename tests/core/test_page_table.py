import random

import pytest

from vllm_expertflow.core.page_table import PageTable, PoolExhaustedError
from vllm_expertflow.core.policy import LRUPolicy


def test_lru_evicts_least_recently_used():
    table = PageTable(2, LRUPolicy())
    a, _ = table.allocate((0, 1))
    b, _ = table.allocate((0, 2))
    table.touch(a)  # (0, 2) is now the oldest
    slot, evicted = table.allocate((0, 3))
    assert evicted == (0, 2) and slot == b
    assert table.lookup((0, 2)) is None and table.lookup((0, 3)) == b


def test_pinned_slot_is_never_evicted():
    table = PageTable(2, LRUPolicy())
    a, _ = table.allocate((0, 1))
    table.allocate((0, 2))
    table.pin(a)  # oldest, but pinned
    _, evicted = table.allocate((1, 1))
    assert evicted == (0, 2)
    assert table.lookup((0, 1)) == a


def test_all_pinned_raises():
    table = PageTable(1, LRUPolicy())
    slot, _ = table.allocate((0, 0))
    table.pin(slot)
    with pytest.raises(PoolExhaustedError):
        table.allocate((0, 1))


def test_random_workload_keeps_one_expert_per_slot():
    rng = random.Random(0)
    table = PageTable(8, LRUPolicy())
    pinned: set[int] = set()
    for _ in range(5000):
        key = (rng.randrange(4), rng.randrange(16))
        slot = table.lookup(key)
        if slot is None:
            if len(pinned) == table.num_slots:
                for s in pinned:
                    table.unpin(s)
                pinned.clear()
            slot, evicted = table.allocate(key)
            assert evicted is None or table.lookup(evicted) is None
            assert slot not in pinned, "a pinned slot was given away"
        if rng.random() < 0.3 and slot not in pinned:
            table.pin(slot)
            pinned.add(slot)
        keys = table.resident_keys()
        slots = [table.lookup(k) for k in keys]
        assert len(set(slots)) == len(slots) <= table.num_slots
        assert all(table.key_in(s) == k for k, s in zip(keys, slots, strict=True))


def test_layer_share_stops_a_layer_cycle_from_thrashing():
    """Three layers run in turn, each needing 2 experts, in a 4-slot pool.

    Global LRU evicts exactly the layer needed next and never hits; with a share of 1 slot per
    layer each layer keeps replacing its own experts, so the others' stay resident.
    """

    def hits(policy) -> int:
        table, count = PageTable(4, policy), 0
        for _ in range(20):
            for layer in range(3):
                for expert in (0, 1):
                    slot = table.lookup((layer, expert))
                    if slot is None:
                        table.allocate((layer, expert))
                    else:
                        table.touch(slot)
                        count += 1
        return count

    assert hits(LRUPolicy()) == 0
    assert hits(LRUPolicy(layer_share=1)) > 0


def test_per_layer_counts_follow_allocations_and_evictions():
    table = PageTable(3, LRUPolicy())
    for key in ((0, 1), (0, 2), (1, 1), (1, 2)):  # the fourth evicts (0, 1)
        table.allocate(key)
    assert (table.num_resident_in(0), table.num_resident_in(1)) == (1, 2)
    assert table.num_resident == 3


def test_a_wide_step_borrows_from_the_layer_that_ran_last_and_pays_it_back():
    """Layers run 1, 2, 0, 1, 2, 0...; layer 0 needs more than its share while pinned. It
    borrows from layer 2 (the layer that ran last, needed again furthest ahead), not layer 1
    (needed next); then layer 2, below its share, takes back from layer 0's surplus."""
    table = PageTable(6, LRUPolicy(layer_share=2))
    for key in ((1, 0), (1, 1), (2, 0), (2, 1)):
        table.allocate(key)
    wide = [table.allocate((0, e))[0] for e in range(2)]  # free slots
    for slot in wide:
        table.pin(slot)
    _, evicted = table.allocate((0, 2))
    for slot in wide:
        table.unpin(slot)
    assert evicted == (2, 0)
    _, evicted = table.allocate((2, 5))
    assert evicted[0] == 0
    assert table.lookup((1, 0)) is not None and table.lookup((1, 1)) is not None
