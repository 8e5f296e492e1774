import random

import torch

from vllm_expertflow.core.device_page_table import DevicePageTable
from vllm_expertflow.core.page_table import PageTable
from vllm_expertflow.core.policy import LRUPolicy


def test_starts_empty_with_layer_ids_mapped_to_rows():
    table = DevicePageTable([3, 5, 9], num_experts=4, device="cpu")
    assert table.table.shape == (3, 4) and table.table.dtype == torch.int32
    assert (table.table == -1).all()
    table.set(5, 2, 7)
    assert table.table[1, 2] == 7 and table.row(5)[2] == 7
    assert table.layers == [3, 5, 9]


def test_updates_write_in_place():
    table = DevicePageTable(2, num_experts=3, device="cpu")
    storage = table.table.data_ptr()
    row = table.row(1)
    table.set(1, 0, 4)
    table.set(1, 2, 0)
    table.clear(1, 0)
    table.load_from(PageTable(2, LRUPolicy()))
    table.set(1, 1, 1)
    assert table.table.data_ptr() == storage
    # A view taken before the updates (what a captured graph holds) sees them.
    assert row.tolist() == [-1, 1, -1]


def test_mirrors_the_host_page_table_through_evictions():
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    num_layers, num_experts = 3, 6
    host = PageTable(5, LRUPolicy())
    device = DevicePageTable(num_layers, num_experts, device="cpu")
    for _ in range(200):
        key = (rng.randrange(num_layers), rng.randrange(num_experts))
        if host.lookup(key) is not None:
            host.touch(host.lookup(key))
            continue
        slot, evicted = host.allocate(key)
        if evicted is not None:
            device.clear(*evicted)
        device.set(*key, slot)
    expected = torch.full((num_layers, num_experts), -1, dtype=torch.int32)
    for layer, expert in host.resident_keys():
        expected[layer, expert] = host.lookup((layer, expert))
    assert torch.equal(device.to_host(), expected), f"seed {seed}"
    reloaded = DevicePageTable(num_layers, num_experts, device="cpu")
    reloaded.load_from(host)
    assert torch.equal(reloaded.to_host(), expected), f"seed {seed}"
