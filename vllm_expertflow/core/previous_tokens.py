"""Each running request's last token at every MoE layer, for predictors that look one token back.

Layer L's router input and MoE output of a token say little about layer L+1's choice that the
previous token's do not add to: layer L+1's attention mixes the earlier tokens in. In a prefill
the previous token is the row above; in a decode forward it ran in an earlier forward, so each
request's last row is kept here, per layer, until the request finishes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

# (request id, first row, end row) of each request's rows in a batch, in row order.
RequestSpans = Sequence[tuple[str, int, int]]


def previous_rows(tensor: torch.Tensor, follows: torch.Tensor) -> torch.Tensor:
    """Each row's previous row where `follows` (bool `[T]`) says it is one, zeros elsewhere."""
    previous = torch.zeros_like(tensor)
    previous[1:] = tensor[:-1]
    previous[~follows] = 0
    return previous


class PreviousTokens:
    def __init__(self) -> None:
        self._last: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    def context(
        self,
        layer: int,
        hidden: torch.Tensor,
        moe_output: torch.Tensor,
        spans: RequestSpans | None,
    ) -> dict[str, torch.Tensor]:
        """The predictor context of a batch, then remembers each request's last row.

        `spans=None` (rows not known by request) gives zero previous tokens, as at a request's
        first token.
        """
        follows = torch.zeros(len(hidden), dtype=torch.bool)
        for _, start, end in spans or ():
            follows[start + 1 : end] = True
        prev_hidden = previous_rows(hidden, follows)
        prev_output = previous_rows(moe_output, follows)
        for request, start, end in spans or ():
            last = self._last.setdefault(request, {}).get(layer)
            if last is not None:
                prev_hidden[start], prev_output[start] = last
            self._last[request][layer] = (hidden[end - 1].clone(), moe_output[end - 1].clone())
        return {
            "moe_output": moe_output,
            "prev_hidden": prev_hidden,
            "prev_moe_output": prev_output,
        }

    def forget(self, requests: Iterable[str]) -> None:
        for request in requests:
            self._last.pop(request, None)
