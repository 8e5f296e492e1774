"""Router ids -> pool slots through one layer's row of the device page table, plus a miss mask."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _remap_topk_kernel(ids_ptr, row_ptr, slots_ptr, miss_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    experts = tl.load(ids_ptr + offs, mask=mask, other=0)
    slots = tl.load(row_ptr + experts, mask=mask, other=-1)
    tl.store(slots_ptr + offs, slots, mask=mask)
    tl.store(miss_ptr + offs, slots < 0, mask=mask)


def remap_topk(
    topk_ids: torch.Tensor, row: torch.Tensor, block: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (slot_ids int32 [T,k], miss bool [T,k]) in one launch; fixed shapes, no sync."""
    assert topk_ids.dim() == 2 and topk_ids.dtype in (torch.int32, torch.int64)
    assert row.dim() == 1 and row.dtype == torch.int32
    assert topk_ids.is_contiguous() and row.is_contiguous()
    assert topk_ids.device == row.device
    slots = torch.empty(topk_ids.shape, dtype=torch.int32, device=topk_ids.device)
    miss = torch.empty(topk_ids.shape, dtype=torch.bool, device=topk_ids.device)
    n = topk_ids.numel()
    if n:
        _remap_topk_kernel[(triton.cdiv(n, block),)](topk_ids, row, slots, miss, n, BLOCK=block)
    return slots, miss


def remap_topk_reference(
    topk_ids: torch.Tensor, row: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    slots = row[topk_ids.long()].to(torch.int32)
    return slots, slots < 0
