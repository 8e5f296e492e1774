import threading

import pytest
import torch

from vllm_expertflow.core.policy import LRUPolicy
from vllm_expertflow.core.pool import ExpertPool
from vllm_expertflow.core.stats import OffloadStats
from vllm_expertflow.core.store import ExpertCodec, RamStore, TensorSpec

NUM_EXPERTS = 8


def make_pool(num_slots: int) -> tuple[ExpertPool, dict[int, torch.Tensor]]:
    store = RamStore(NUM_EXPERTS, pin_memory=False)
    weights = {}
    for layer in range(3):
        w13 = torch.randn(NUM_EXPERTS, 8, 4)
        store.write_layer(layer, {"w13": w13, "w2": torch.randn(NUM_EXPERTS, 4, 4)})
        weights[layer] = w13
    store.finish_writing()
    pool = ExpertPool(store, num_slots, torch.device("cpu"), range(3), LRUPolicy(), OffloadStats())
    return pool, weights


def test_slots_hold_the_requested_experts_and_count_hits():
    pool, weights = make_pool(4)
    slots = pool.ensure_resident(0, [3, 5])
    assert torch.equal(pool.w13[slots[0]], weights[0][3])
    assert torch.equal(pool.w13[slots[1]], weights[0][5])
    pool.release(slots)
    again = pool.ensure_resident(0, [5, 6])
    pool.release(again)
    assert again[0] == slots[1]
    stats = pool.stats.layer(0)
    assert (stats.hits, stats.misses) == (1, 3)
    assert stats.bytes_loaded == 3 * pool.store.layout.nbytes


def test_expert_biases_travel_with_their_expert_into_the_same_slot():
    store = RamStore(NUM_EXPERTS, pin_memory=False)
    layer = {
        "w13": torch.randn(NUM_EXPERTS, 8, 4),
        "w2": torch.randn(NUM_EXPERTS, 4, 4),
        "w13_bias": torch.randn(NUM_EXPERTS, 8),
        "w2_bias": torch.randn(NUM_EXPERTS, 4),
    }
    store.write_layer(0, layer)
    store.finish_writing()
    pool = ExpertPool(store, 2, torch.device("cpu"), [0], LRUPolicy(), OffloadStats())
    assert set(pool.slot_tensors) == set(layer)
    for experts in ([5, 2], [7]):  # 7 evicts 5: its slot's biases must be 7's, not 5's
        slots = pool.ensure_resident(0, experts)
        for expert, slot in zip(experts, slots, strict=True):
            for name, weights in layer.items():
                assert torch.equal(pool.slot_tensors[name][slot], weights[expert])
        pool.release(slots)
    assert pool.stats.layer(0).bytes_loaded == 3 * store.layout.nbytes


def test_experts_of_the_current_step_are_never_evicted():
    pool, weights = make_pool(4)
    first = pool.ensure_resident(0, [0, 1])
    second = pool.ensure_resident(1, [0, 1])  # fills the pool while the first is pinned
    assert set(first).isdisjoint(second)
    pool.release(first)
    pool.release(second)
    # Pin two, then ask for two new ones: only the two unpinned may go.
    kept = pool.ensure_resident(0, [0, 1])
    fresh = pool.ensure_resident(2, [6, 7])
    assert set(fresh) == set(second)
    assert torch.equal(pool.w13[kept[0]], weights[0][0])
    pool.release(kept)
    pool.release(fresh)


def test_lru_order_across_steps():
    pool, _ = make_pool(2)
    for experts in ([0], [1], [0], [2]):  # expert 1 is least recently used when 2 arrives
        pool.release(pool.ensure_resident(0, experts))
    assert pool.table.lookup((0, 1)) is None
    assert pool.table.lookup((0, 0)) is not None and pool.table.lookup((0, 2)) is not None


def test_a_static_hot_set_stays_and_leaves_the_rest_for_misses():
    pool, weights = make_pool(4)
    pool.pin_permanently([(0, 1), (1, 2)])
    assert pool.round_capacity == 2
    for experts in ([5, 6], [6, 7], [3, 4]):  # misses cycle through the two free slots
        pool.release(pool.ensure_resident(2, experts))
    slots = pool.ensure_resident(0, [1])
    assert pool.stats.layer(0).hits == 1
    assert torch.equal(pool.w13[slots[0]], weights[0][1])
    pool.release(slots)


class ScaledInt8Codec(ExpertCodec):
    """Stores experts as int8 codes with one scale each; slots hold float32."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def slot_specs(self, layout):
        parts = {p.name: p for p in layout.parts}
        return (
            TensorSpec("w13", parts["w13_codes"].shape, torch.float32),
            TensorSpec("w2", parts["w2_codes"].shape, torch.float32),
        )

    def decode(self, records, slots):
        self.threads.append(threading.current_thread().name)
        slots["w13"].copy_(records["w13_codes"].float() * records["scale"])
        slots["w2"].copy_(records["w2_codes"].float() * records["scale"])


def int8_pool(num_slots: int = 2) -> tuple[ExpertPool, torch.Tensor, torch.Tensor]:
    """A pool over int8 records, with the records' codes and scales."""
    store = RamStore(NUM_EXPERTS, pin_memory=False)
    codes = torch.randint(-100, 100, (NUM_EXPERTS, 8, 4), dtype=torch.int8)
    scale = torch.rand(NUM_EXPERTS, 1, 1) + 0.5
    store.write_layer(0, {"w13_codes": codes, "w2_codes": codes[:, :4], "scale": scale})
    store.finish_writing()
    codec = ScaledInt8Codec()
    pool = ExpertPool(
        store, num_slots, torch.device("cpu"), [0], LRUPolicy(), OffloadStats(), codec=codec
    )
    return pool, codes, scale


def test_a_codec_decodes_compressed_records_into_slots_and_loads_count_stored_bytes():
    pool, codes, scale = int8_pool()
    assert pool.w13.dtype == torch.float32 and pool.w13.shape == (2, 8, 4)
    slots = pool.ensure_resident(0, [6])
    assert torch.equal(pool.w13[slots[0]], codes[6].float() * scale[6])
    assert torch.equal(pool.w2[slots[0]], codes[6, :4].float() * scale[6])
    assert pool.stats.layer(0).bytes_loaded == 8 * 4 + 4 * 4 + 4  # the record, not the slot


def assert_device_table_matches_page_table(pool: ExpertPool) -> None:
    pool.drain()
    expected = torch.full((3, NUM_EXPERTS), -1, dtype=torch.int32)
    for layer, expert in pool.table.resident_keys():
        expected[layer, expert] = pool.table.lookup((layer, expert))
    assert torch.equal(pool.device_table.to_host(), expected)


def test_the_device_table_follows_loads_prefetches_and_evictions():
    pool, _ = make_pool(3)
    pool.release(pool.ensure_resident(0, [1, 2]))
    pool.prefetch(1, 4)
    assert_device_table_matches_page_table(pool)
    pool.release(pool.ensure_resident(2, [5, 6]))  # evicts two of the three
    assert_device_table_matches_page_table(pool)
    assert (pool.device_table.to_host() >= 0).sum() == 3


def test_admit_books_a_finished_layer_and_loads_its_misses_in_the_background():
    pool, weights = make_pool(4)
    pool.admit(0, [1, 2])
    assert_device_table_matches_page_table(pool)
    slot = int(pool.device_table.row(0)[2])
    assert torch.equal(pool.w13[slot], weights[0][2])
    pool.admit(0, [2, 3])
    stats = pool.stats.layer(0)
    assert (stats.hits, stats.misses, stats.stall_seconds) == (1, 3, 0.0)
    pool.drain()
    assert stats.bytes_loaded == 3 * pool.store.layout.nbytes


def test_admit_loads_only_what_fits_beside_pinned_slots():
    pool, _ = make_pool(3)
    first = pool.ensure_resident(0, [0, 1])  # a step still running keeps two slots pinned
    pool.admit(1, [4, 5, 6])
    pool.drain()
    assert pool.table.lookup((1, 4)) is not None
    assert pool.table.lookup((1, 5)) is None and pool.table.lookup((1, 6)) is None
    assert pool.stats.layer(1).misses == 3
    pool.release(first)
    assert_device_table_matches_page_table(pool)


def test_a_prefetch_decodes_compressed_records_on_the_io_thread():
    pool, codes, scale = int8_pool()
    assert pool.prefetch(0, 5)
    slots = pool.ensure_resident(0, [5])  # waits for the prefetch, a hit
    assert torch.equal(pool.w13[slots[0]], codes[5].float() * scale[5])
    assert pool.codec.threads[0].startswith("expertflow-io")
    assert pool.stats.layer(0).hits == 1 and pool.stats.layer(0).prefetches_used == 1


def test_measuring_loads_reads_through_the_link_and_leaves_the_pool_as_it_was():
    from vllm_expertflow.core.link import EmulatedLink

    pool, weights = make_pool(4)
    slots = pool.ensure_resident(0, [3, 5])
    pool.release(slots)
    before = (pool.w13.clone(), pool.stats.as_dict(), pool.device_table.row(0).clone())
    # A link that moves one expert in 5 ms: loads share it, so none can be faster on average.
    pool.link = EmulatedLink(pool.store.layout.nbytes / 0.005 / 1e9)
    # With 1, 2 and 3 loads in flight (its I/O thread and two demand readers).
    seconds = pool.measure_load_seconds(8)
    assert len(seconds) == 3 and min(seconds) >= 0.005
    # Slots never loaded hold whatever memory `torch.empty` gave, NaNs included.
    torch.testing.assert_close(pool.w13, before[0], rtol=0, atol=0, equal_nan=True)
    assert pool.stats.as_dict() == before[1]
    assert torch.equal(pool.device_table.row(0), before[2])


def test_a_layers_demand_misses_load_together_on_the_calling_thread_and_a_demand_reader():
    pool, codes, scale = int8_pool()
    slots = pool.ensure_resident(0, [1, 2])
    assert torch.equal(pool.w13[slots[0]], codes[1].float() * scale[1])
    assert torch.equal(pool.w13[slots[1]], codes[2].float() * scale[2])
    main, helper = sorted(
        pool.codec.threads, key=lambda name: name != threading.current_thread().name
    )
    assert main == threading.current_thread().name and helper.startswith("expertflow-demand")
    assert pool.stats.layer(0).misses == 2


def test_loads_in_flight_together_share_the_store_time_they_are_charged():
    from vllm_expertflow.core.link import EmulatedLink

    pool, _ = make_pool(4)
    # One link that moves an expert in 5 ms: two misses load at once but land at 5 and 10 ms.
    pool.link = EmulatedLink(pool.store.layout.nbytes / 0.005 / 1e9)
    pool.release(pool.ensure_resident(0, [1, 2]))
    total = pool.stats.layer(0)
    # Wall times add up to about 15 ms; the store was busy about 10 ms, and no longer than
    # the loads took.
    assert 0.010 <= total.link_seconds < total.load_seconds


def test_a_layers_demand_misses_are_shared_evenly_by_the_readers():
    pool, codes, scale = int8_pool(num_slots=5)
    slots = pool.ensure_resident(0, [1, 2, 3, 4, 5])
    for slot, expert in zip(slots, [1, 2, 3, 4, 5], strict=True):
        assert torch.equal(pool.w13[slot], codes[expert].float() * scale[expert])
    here = threading.current_thread().name
    assert sorted(pool.codec.threads.count(name) for name in set(pool.codec.threads)) == [2, 3]
    assert pool.codec.threads.count(here) == 3  # the calling thread takes the first share


def test_fill_loads_experts_that_stay_evictable():
    pool, weights = make_pool(4)
    pool.fill([(0, 1), (1, 2), (2, 3)])
    assert torch.equal(pool.w13[pool.table.lookup((1, 2))], weights[1][2])
    assert pool.round_capacity == 4  # nothing pinned for good
    slots = pool.ensure_resident(0, [1, 5, 6])  # (0, 1) hits, one filled expert gives way
    assert pool.stats.layer(0).hits == 1
    pool.release(slots)


def test_a_pool_filled_layer_by_layer_views_each_layers_experts_in_expert_order():
    every = [(layer, e) for layer in range(3) for e in range(NUM_EXPERTS)]
    pool, weights = make_pool(len(every))
    pool.fill(every)
    assert pool.holds_every_expert
    for layer in range(3):  # indexed by router ids, each view holds its own layer's experts
        assert torch.equal(pool.layer_views[layer]["w13"], weights[layer])
    shuffled, _ = make_pool(len(every))
    shuffled.fill(every[::-1])  # every expert, but in slots the ids do not index: no views
    assert shuffled.holds_every_expert and shuffled.layer_views is None


def test_a_failed_background_load_is_raised_not_computed_on():
    pool, _ = make_pool(4)

    def failing_read(layer, expert):
        raise OSError(f"expert {expert} of layer {layer} is unreadable")

    pool.store.read_expert = failing_read
    assert pool.prefetch(1, 3)
    pool._io.submit(lambda: None).result()  # the one I/O thread has run the prefetch
    with pytest.raises(OSError, match="expert 3 of layer 1 is unreadable"):
        pool.ensure_resident(0, [0])


def test_a_pool_that_keeps_only_the_books_decides_as_the_real_one_and_moves_nothing():
    real, _ = make_pool(3)
    books, _ = make_pool(3)
    books.moves_data = False
    books.w13.zero_()
    for pool in (real, books):
        pool.release(pool.ensure_resident(0, [1, 2]))
        pool.prefetch(1, 4)
        pool.release(pool.ensure_resident(2, [5, 6]))  # evicts two of the three
    assert books.table.resident_keys() == real.table.resident_keys()
    assert [books.table.lookup(k) for k in real.table.resident_keys()] == [
        real.table.lookup(k) for k in real.table.resident_keys()
    ]
    for layer in range(3):
        counts = [
            (s.hits, s.misses, s.prefetches_issued)
            for s in (books.stats.layer(layer), real.stats.layer(layer))
        ]
        assert counts[0] == counts[1]
    assert books.stats.layer(2).bytes_loaded == 0 < real.stats.layer(2).bytes_loaded
    assert not books.w13.any()  # no slot was written
    assert (books.device_table.to_host() == -1).all()  # nor the table kernels read
