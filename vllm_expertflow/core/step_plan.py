"""Splitting one layer-step into rounds that each fit in the pool."""

from __future__ import annotations

import torch


def plan_rounds(
    topk_ids: torch.Tensor, max_experts: int
) -> list[tuple[torch.Tensor | None, list[int]]]:
    """Groups tokens so that each group routes to at most `max_experts` distinct experts.

    Returns `(token_indices, experts)` per round; `token_indices` is None when the whole batch
    fits in one round. Tokens are never split across rounds: each token's top-k experts are
    computed in one kernel call, exactly as the stock backend computes them.
    """
    experts = torch.unique(topk_ids).tolist()
    if len(experts) <= max_experts:
        return [(None, experts)]
    rounds: list[tuple[list[int], set[int]]] = []
    for token, token_experts in enumerate(topk_ids.tolist()):
        wanted = set(token_experts)
        assert len(wanted) <= max_experts, "a token needs more experts than the pool has slots"
        if rounds and len(rounds[-1][1] | wanted) <= max_experts:
            rounds[-1][0].append(token)
            rounds[-1][1].update(wanted)
        else:
            rounds.append(([token], wanted))
    return [
        (torch.tensor(tokens, dtype=torch.long, device=topk_ids.device), sorted(group))
        for tokens, group in rounds
    ]
