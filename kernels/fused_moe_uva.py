"""A small-batch MoE kernel that reads each expert from its pool slot, or, on a miss, straight
from the pinned host store, so a miss inside a captured decode step never stalls the host.

out[t] = sum_k w[t,k] * (silu(x W_gate^T) * (x W_up^T)) W2^T with e = topk_ids[t,k]; w13 rows
are the gate rows then the up rows (vLLM's layout).

Two launches, each gridded over (expert, block of output columns): a program serves every
token routed to its expert, so an expert's weights cross the bus once per step even when many
tokens picked it, and programs of unrouted experts do nothing. The page-table row picks, per
expert, the slot tensor or the host tensor as the base pointer.

UVA route on CUDA: pass the host store tensors as they are, pinned CPU tensors. Memory that
torch pins (cudaHostAlloc) is mapped into the device's unified address space, and Triton's
launcher turns every pointer argument into a device pointer with
cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_DEVICE_POINTER), which succeeds for such memory;
for pageable memory it fails with "Pointer argument cannot be accessed from Triton (cpu
tensor?)", which is why the launcher insists on pinned host tensors. Under graph capture the
translated pointer is baked into the graph, so the store must stay allocated at the same
address. In Triton's interpreter (TRITON_INTERPRET=1) every tensor is a CPU tensor and the
same code runs unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOKENS = 64


@triton.jit
def _routing(
    ids_ptr, e, num_tokens, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Which tokens picked expert `e` and at which of their top-k positions (a pair index)."""
    t = tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_K)
    valid = (t[:, None] < num_tokens) & (k[None, :] < TOP_K)
    ids = tl.load(ids_ptr + t[:, None] * TOP_K + k[None, :], mask=valid, other=-1)
    match = (ids == e) & valid
    routed = tl.max(match.to(tl.int32), axis=1) > 0
    pair = t * TOP_K + tl.sum(tl.where(match, k[None, :], 0), axis=1)
    return t, routed, pair


@triton.jit
def _expert_base(pool_ptr, host_ptr, row_ptr, e, expert_numel):
    slot = tl.load(row_ptr + e)
    pool_base = pool_ptr + slot.to(tl.int64) * expert_numel
    host_base = host_ptr + e.to(tl.int64) * expert_numel
    return tl.where(slot >= 0, pool_base, host_base)


@triton.jit
def _moe_up_kernel(
    x_ptr,
    ids_ptr,
    row_ptr,
    w13_pool_ptr,
    w13_host_ptr,
    act_ptr,
    num_tokens,
    hidden,
    inter,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    e = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    t, routed, pair = _routing(ids_ptr, e, num_tokens, TOP_K, BLOCK_T, BLOCK_K)
    if tl.max(routed.to(tl.int32), axis=0) > 0:
        w13 = _expert_base(w13_pool_ptr, w13_host_ptr, row_ptr, e, 2 * inter * hidden)
        gate = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
        up = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            x = tl.load(
                x_ptr + t[:, None] * hidden + h[None, :],
                mask=routed[:, None] & (h[None, :] < hidden),
                other=0.0,
            )
            w_mask = (i[:, None] < inter) & (h[None, :] < hidden)
            w_gate = tl.load(w13 + i[:, None] * hidden + h[None, :], mask=w_mask, other=0.0)
            w_up = tl.load(w13 + (i[:, None] + inter) * hidden + h[None, :], mask=w_mask, other=0.0)
            # Dots run on float32 tiles: bf16/fp16 values are exact in tf32, so the device
            # loses nothing, and Triton's interpreter mis-computes bf16 dots.
            x = x.to(tl.float32)
            gate = tl.dot(x, tl.trans(w_gate.to(tl.float32)), gate)
            up = tl.dot(x, tl.trans(w_up.to(tl.float32)), up)
        act = gate * tl.sigmoid(gate) * up
        tl.store(
            act_ptr + pair[:, None] * inter + i[None, :],
            act,
            mask=routed[:, None] & (i[None, :] < inter),
        )


@triton.jit
def _moe_down_kernel(
    act_ptr,
    ids_ptr,
    weights_ptr,
    row_ptr,
    w2_pool_ptr,
    w2_host_ptr,
    y_ptr,
    num_tokens,
    hidden,
    inter,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    e = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t, routed, pair = _routing(ids_ptr, e, num_tokens, TOP_K, BLOCK_T, BLOCK_K)
    if tl.max(routed.to(tl.int32), axis=0) > 0:
        w2 = _expert_base(w2_pool_ptr, w2_host_ptr, row_ptr, e, hidden * inter)
        acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        for i0 in range(0, inter, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            act = tl.load(
                act_ptr + pair[:, None] * inter + i[None, :],
                mask=routed[:, None] & (i[None, :] < inter),
                other=0.0,
            )
            w = tl.load(
                w2 + h[:, None] * inter + i[None, :],
                mask=(h[:, None] < hidden) & (i[None, :] < inter),
                other=0.0,
            )
            # The activation is rounded to the weights' dtype, as vLLM's fused_moe does.
            act = act.to(w.dtype).to(tl.float32)
            acc = tl.dot(act, tl.trans(w.to(tl.float32)), acc)
        weight = tl.load(weights_ptr + pair, mask=routed, other=0.0).to(tl.float32)
        tl.store(
            y_ptr + pair[:, None] * hidden + h[None, :],
            acc * weight[:, None],
            mask=routed[:, None] & (h[None, :] < hidden),
        )


def _check_inputs(x, topk_ids, topk_weights, row, w13_pool, w2_pool, w13_host, w2_host) -> None:
    num_tokens, hidden = x.shape
    assert 0 < num_tokens <= MAX_TOKENS, f"fused_moe_uva serves decode batches of <= {MAX_TOKENS}"
    assert topk_ids.dtype in (torch.int32, torch.int64) and topk_ids.shape[0] == num_tokens
    assert topk_weights.shape == topk_ids.shape and topk_weights.is_floating_point()
    assert row.dtype == torch.int32 and row.numel() == w13_host.shape[0]
    assert w13_pool.dim() == 3 and w13_pool.shape[2] == hidden and w13_pool.shape[1] % 2 == 0
    inter = w13_pool.shape[1] // 2
    assert w2_pool.shape[0] == w13_pool.shape[0] and w2_pool.shape[1:] == (hidden, inter)
    assert w13_host.shape[1:] == w13_pool.shape[1:] and w2_host.shape[1:] == w2_pool.shape[1:]
    assert w2_host.shape[0] == w13_host.shape[0]
    tensors = (x, topk_ids, topk_weights, row, w13_pool, w2_pool, w13_host, w2_host)
    assert all(tensor.is_contiguous() for tensor in tensors)
    assert all(w.dtype == x.dtype for w in (w13_pool, w2_pool, w13_host, w2_host))
    device_tensors = (topk_ids, topk_weights, row, w13_pool, w2_pool)
    assert all(tensor.device == x.device for tensor in device_tensors)
    if x.is_cuda:
        assert w13_host.is_pinned() and w2_host.is_pinned(), "UVA needs a pinned host store"


def fused_moe_uva(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    row: torch.Tensor,
    w13_pool: torch.Tensor,
    w2_pool: torch.Tensor,
    w13_host: torch.Tensor,
    w2_host: torch.Tensor,
    block_h: int = 64,
    block_i: int = 64,
) -> torch.Tensor:
    """MoE output [T,H] for a decode batch; misses (row[e] < 0) read the host store directly.

    x [T,H]; topk_ids, topk_weights [T,k]; row [E] int32 slot ids; w13_pool [S,2I,H],
    w2_pool [S,H,I] on the device; w13_host [E,2I,H], w2_host [E,H,I] pinned on the host.
    Allocations are fixed-size, so the call can be captured in a CUDA graph.
    """
    _check_inputs(x, topk_ids, topk_weights, row, w13_pool, w2_pool, w13_host, w2_host)
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts = w13_host.shape[0]
    inter = w13_pool.shape[1] // 2
    # tl.dot needs at least 16 rows.
    block_t = max(16, triton.next_power_of_2(num_tokens))
    shape = dict(
        TOP_K=top_k,
        BLOCK_T=block_t,
        BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_H=block_h,
        BLOCK_I=block_i,
    )
    act = torch.empty(num_tokens * top_k, inter, dtype=torch.float32, device=x.device)
    # Zeroed so that an out-of-range id contributes nothing instead of garbage.
    y = torch.zeros(num_tokens, top_k, hidden, dtype=torch.float32, device=x.device)
    up_grid = (num_experts, triton.cdiv(inter, block_i))
    _moe_up_kernel[up_grid](
        x, topk_ids, row, w13_pool, w13_host, act, num_tokens, hidden, inter, **shape
    )
    down_grid = (num_experts, triton.cdiv(hidden, block_h))
    _moe_down_kernel[down_grid](
        act, topk_ids, topk_weights, row, w2_pool, w2_host, y, num_tokens, hidden, inter, **shape
    )
    return y.sum(dim=1).to(x.dtype)


def fused_moe_uva_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    row: torch.Tensor,
    w13_pool: torch.Tensor,
    w2_pool: torch.Tensor,
    w13_host: torch.Tensor,
    w2_host: torch.Tensor,
) -> torch.Tensor:
    """A plain loop in float32 on the CPU, with the activation rounded like the kernel's."""
    inter = w13_pool.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            slot = int(row[e])
            w13 = (w13_pool[slot] if slot >= 0 else w13_host[e]).float().cpu()
            w2 = (w2_pool[slot] if slot >= 0 else w2_host[e]).float().cpu()
            h = x[t].float().cpu()
            gate, up = w13[:inter] @ h, w13[inter:] @ h
            act = (torch.nn.functional.silu(gate) * up).to(x.dtype).float()
            out[t] += float(topk_weights[t, k]) * (w2 @ act)
    return out.to(x.dtype)
