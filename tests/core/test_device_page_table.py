import torch

from vllm_expertflow.core.device_page_table import DevicePageTable


def test_starts_empty_with_layer_ids_mapped_to_rows():
    table = DevicePageTable([3, 5, 9], num_experts=4, device="cpu")
    assert table.table.shape == (3, 4) and table.table.dtype == torch.int32
    assert (table.table == -1).all()
    table.set(5, 2, 7)
    assert table.table[1, 2] == 7 and table.row(5)[2] == 7
    assert table.layers == [3, 5, 9]


def test_updates_write_in_place():
    table = DevicePageTable([0, 1], num_experts=3, device="cpu")
    storage = table.table.data_ptr()
    row = table.row(1)
    table.set(1, 0, 4)
    table.set(1, 2, 0)
    table.clear(1, 0)
    table.clear(1, 2)
    table.set(1, 1, 1)
    assert table.table.data_ptr() == storage
    # A view taken before the updates (what a captured graph holds) sees them.
    assert row.tolist() == [-1, 1, -1]


def test_remap_is_one_gather_keeping_the_router_dtype():
    table = DevicePageTable([4, 7], num_experts=5, device="cpu")
    for expert, slot in [(0, 3), (2, 0), (4, 1)]:
        table.set(7, expert, slot)
    table.set(4, 2, 2)
    topk_ids = torch.tensor([[4, 0], [2, 4]], dtype=torch.int64)
    slots = table.remap(7, topk_ids)
    assert slots.dtype == torch.int64
    assert slots.tolist() == [[1, 3], [0, 1]]
    assert table.remap(4, torch.tensor([[2]], dtype=torch.int32)).tolist() == [[2]]


def test_remap_keeps_the_router_ids_dtype_and_reads_small_ids_as_indices():
    table = DevicePageTable([0], num_experts=4, device="cpu")
    for expert, slot in ((0, 3), (1, 2), (2, 1), (3, 0)):
        table.set(0, expert, slot)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        ids = torch.tensor([[1, 0], [3, 2]], dtype=dtype)
        slots = table.remap(0, ids)
        assert slots.dtype == dtype and slots.tolist() == [[2, 3], [0, 1]]
