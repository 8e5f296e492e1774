import torch

from vllm_expertflow.core.step_plan import plan_rounds


def test_one_round_when_everything_fits():
    topk_ids = torch.tensor([[0, 1], [1, 2]])
    assert plan_rounds(topk_ids, 3) == [(None, [0, 1, 2])]


def test_rounds_cover_every_token_once_within_budget():
    torch.manual_seed(0)
    topk_ids = torch.stack([torch.randperm(32)[:4] for _ in range(50)])
    rounds = plan_rounds(topk_ids, 6)
    assert len(rounds) > 1
    tokens = torch.cat([t for t, _ in rounds])
    assert sorted(tokens.tolist()) == list(range(50))
    for token_indices, experts in rounds:
        assert len(experts) <= 6
        assert set(topk_ids[token_indices].flatten().tolist()) == set(experts)
