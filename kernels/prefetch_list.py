"""Which experts of a target layer to prefetch: predicted by many tokens and not resident.

Everything, the per-token top-k included, runs in one single-program launch with fixed-size
outputs, so the step that chooses prefetches can be captured in a CUDA graph. The per-token
top-k and the final ordering use pairwise ranks (an expert's rank is how many experts beat it),
which fits one program for E up to a few hundred and needs no sort.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_prefetch_list_kernel(
    scores_ptr,
    row_ptr,
    out_ptr,
    count_ptr,
    T,
    E,
    TOP_K: tl.constexpr,
    BUDGET: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    e = tl.arange(0, BLOCK_E)
    e_valid = e < E
    votes = tl.zeros([BLOCK_E], dtype=tl.int32)
    total = tl.zeros([BLOCK_E], dtype=tl.float32)
    for t in range(T):
        s = tl.load(scores_ptr + t * E + e, mask=e_valid, other=float("-inf")).to(tl.float32)
        s_i = s[:, None]
        s_j = s[None, :]
        # Expert j beats i on a higher score, or an equal score and a lower id.
        beats = (s_j > s_i) | ((s_j == s_i) & (e[None, :] < e[:, None]))
        beats = beats & e_valid[None, :]
        rank = tl.sum(beats.to(tl.int32), axis=1)
        votes += ((rank < TOP_K) & e_valid).to(tl.int32)
        total += tl.where(e_valid, s, 0.0)
    mean = total / T
    resident = tl.load(row_ptr + e, mask=e_valid, other=0) >= 0
    candidate = (votes > 0) & ~resident & e_valid

    v_i = votes[:, None]
    v_j = votes[None, :]
    m_i = mean[:, None]
    m_j = mean[None, :]
    better = (v_j > v_i) | (
        (v_j == v_i) & ((m_j > m_i) | ((m_j == m_i) & (e[None, :] < e[:, None])))
    )
    order = tl.sum((better & candidate[None, :]).to(tl.int32), axis=1)

    # Gather rather than scatter: each output position picks the candidate of that rank.
    p = tl.arange(0, BLOCK_B)
    hit = (order[None, :] == p[:, None]) & candidate[None, :]
    picked = tl.sum(tl.where(hit, e[None, :], 0), axis=1)
    found = tl.sum(hit.to(tl.int32), axis=1) > 0
    tl.store(out_ptr + p, tl.where(found, picked, -1), mask=p < BUDGET)
    count = tl.minimum(tl.sum(candidate.to(tl.int32), axis=0), BUDGET)
    tl.store(count_ptr, count)


def gather_prefetch_list(
    scores: torch.Tensor, row: torch.Tensor, top_k: int, budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (expert ids int32 [budget] padded with -1, count int32 [1]).

    Experts are ranked by how many tokens have them in their top-k of `scores` [T,E], ties by
    mean score, then by id; only experts not resident in `row` (slot < 0) are listed.
    """
    assert scores.dim() == 2 and scores.is_floating_point() and scores.is_contiguous()
    assert row.dim() == 1 and row.dtype == torch.int32 and row.is_contiguous()
    num_tokens, num_experts = scores.shape
    assert row.numel() == num_experts and scores.device == row.device
    assert num_tokens > 0 and 0 < top_k <= num_experts and budget > 0
    out = torch.empty(budget, dtype=torch.int32, device=scores.device)
    count = torch.empty(1, dtype=torch.int32, device=scores.device)
    _gather_prefetch_list_kernel[(1,)](
        scores,
        row,
        out,
        count,
        num_tokens,
        num_experts,
        TOP_K=top_k,
        BUDGET=budget,
        BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_B=triton.next_power_of_2(budget),
    )
    return out, count


def gather_prefetch_list_reference(
    scores: torch.Tensor, row: torch.Tensor, top_k: int, budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = scores.float().cpu()
    row = row.cpu()
    num_experts = scores.shape[1]
    picks = scores.topk(top_k, dim=-1).indices.flatten()
    votes = torch.bincount(picks, minlength=num_experts)
    mean = scores.mean(0)
    candidates = [e for e in range(num_experts) if votes[e] > 0 and row[e] < 0]
    candidates.sort(key=lambda e: (-int(votes[e]), -float(mean[e]), e))
    chosen = candidates[:budget]
    out = torch.full((budget,), -1, dtype=torch.int32)
    out[: len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out, torch.tensor([len(chosen)], dtype=torch.int32)
