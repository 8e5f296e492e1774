import pytest
import torch
from vllm_expertflow.kernels.remap import remap_topk, remap_topk_reference

from vllm_expertflow.core.device_page_table import DevicePageTable


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (37, 8), (70, 6)])
def test_matches_reference(generator, shape, dtype):
    num_tokens, top_k = shape
    num_experts = 16
    row = torch.randint(-1, 12, (num_experts,), generator=generator, dtype=torch.int32)
    row[0], row[1] = -1, 5  # at least one miss and one hit are possible
    ids = torch.randint(0, num_experts, shape, generator=generator).to(dtype)
    slots, miss = remap_topk(ids, row, block=64)
    ref_slots, ref_miss = remap_topk_reference(ids, row)
    assert slots.dtype == torch.int32 and miss.dtype == torch.bool
    assert torch.equal(slots, ref_slots) and torch.equal(miss, ref_miss)


def test_rejects_a_non_contiguous_row():
    row = torch.zeros(8, 2, dtype=torch.int32)[:, 0]
    with pytest.raises(AssertionError):
        remap_topk(torch.zeros(2, 2, dtype=torch.int32), row)


def test_reads_a_row_of_the_device_page_table():
    table = DevicePageTable([2, 6], num_experts=8, device="cpu")
    table.set(6, 3, 1)
    table.set(6, 5, 0)
    ids = torch.tensor([[3, 5], [0, 3]], dtype=torch.int32)
    slots, miss = remap_topk(ids, table.row(6))
    assert slots.tolist() == [[1, 0], [-1, 1]]
    assert miss.tolist() == [[False, False], [True, False]]
    table.clear(6, 3)
    slots, miss = remap_topk(ids, table.row(6))
    assert slots.tolist() == [[-1, 0], [-1, -1]]
