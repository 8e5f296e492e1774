"""Splitting one layer-step into rounds that each fit in the pool."""

from __future__ import annotations

import torch

# A round: its tokens' indices (None: the whole batch) and the distinct experts they route to.
Round = tuple[torch.Tensor | None, list[int]]
# The same with the tokens' indices as a list.
TokenGroup = tuple[list[int] | None, list[int]]


def plan_rounds(topk_ids: torch.Tensor, max_experts: int) -> list[Round]:
    """`group_tokens` of a batch's router ids `[T, k]`, with each round's tokens as a tensor."""
    return [
        (None if tokens is None else torch.tensor(tokens, device=topk_ids.device), experts)
        for tokens, experts in group_tokens(topk_ids.tolist(), max_experts)
    ]


def group_tokens(token_experts: list[list[int]], max_experts: int) -> list[TokenGroup]:
    """Groups tokens so that each group routes to at most `max_experts` distinct experts.

    Returns `(token_indices, experts)` per round, experts ascending; `token_indices` is None
    when the whole batch fits in one round. Tokens are never split across rounds: each token's
    top-k experts are computed in one kernel call, exactly as the stock backend computes them.
    Plain lists: a decode step's few ids are planned faster than a tensor op would start.
    """
    experts = sorted(set().union(*token_experts))
    if len(experts) <= max_experts:
        return [(None, experts)]
    rounds: list[tuple[list[int], set[int]]] = []
    for token, ids in enumerate(token_experts):
        wanted = set(ids)
        assert len(wanted) <= max_experts, "a token needs more experts than the pool has slots"
        if rounds and len(rounds[-1][1] | wanted) <= max_experts:
            rounds[-1][0].append(token)
            rounds[-1][1].update(wanted)
        else:
            rounds.append(([token], wanted))
    return [(tokens, sorted(group)) for tokens, group in rounds]
