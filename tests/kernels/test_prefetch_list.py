import pytest
import torch
from vllm_expertflow.kernels.prefetch_list import (
    gather_prefetch_list,
    gather_prefetch_list_reference,
)


def _scores(generator: torch.Generator, num_tokens: int, num_experts: int) -> torch.Tensor:
    """Distinct per token and multiples of 1/1024, so sums are exact in any order: the kernel
    and the reference then agree on every tie of votes and of mean scores."""
    rows = [torch.randperm(num_experts, generator=generator) for _ in range(num_tokens)]
    return (torch.stack(rows).float() + 1) / 1024


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,budget",
    [(1, 8, 2, 3), (5, 8, 2, 8), (7, 60, 8, 5), (3, 128, 8, 16), (16, 40, 4, 33)],
)
def test_matches_reference(generator, num_tokens, num_experts, top_k, budget):
    scores = _scores(generator, num_tokens, num_experts)
    row = torch.randint(-1, 4, (num_experts,), generator=generator, dtype=torch.int32)
    row[torch.rand(num_experts, generator=generator) < 0.5] = -1
    ids, count = gather_prefetch_list(scores, row, top_k, budget)
    ref_ids, ref_count = gather_prefetch_list_reference(scores, row, top_k, budget)
    assert ids.shape == (budget,) and count.shape == (1,)
    assert torch.equal(ids, ref_ids) and torch.equal(count, ref_count)


def test_votes_win_over_mean_score_and_residents_are_skipped():
    scores = torch.tensor(
        [[0.9, 0.5, 0.1, 0.7], [0.0, 0.5, 0.3, 0.2], [0.0, 0.5, 0.4, 0.1]], dtype=torch.float32
    )
    row = torch.tensor([-1, 3, -1, -1], dtype=torch.int32)
    ids, count = gather_prefetch_list(scores, row, top_k=2, budget=4)
    # Expert 1 (two votes) is resident; 2 (two votes) beats 3 and 0 (one vote each, higher
    # means), and 3 beats 0 on its mean.
    assert ids.tolist() == [2, 3, 0, -1] and count.item() == 3


def test_bf16_scores():
    generator = torch.Generator().manual_seed(1)
    scores = _scores(generator, 4, 16).bfloat16()
    row = torch.full((16,), -1, dtype=torch.int32)
    ids, count = gather_prefetch_list(scores, row, 2, 4)
    ref_ids, ref_count = gather_prefetch_list_reference(scores, row, 2, 4)
    assert torch.equal(ids, ref_ids) and torch.equal(count, ref_count)
