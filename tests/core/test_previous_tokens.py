import torch

from vllm_expertflow.core.previous_tokens import PreviousTokens


def rows(*values: float) -> torch.Tensor:
    return torch.tensor(values).unsqueeze(1)


def test_previous_rows_come_from_the_batch_then_from_earlier_steps():
    tokens = PreviousTokens()
    # Step 1: a prefill of three rows for "a" and one row for "b".
    first = tokens.context(0, rows(1, 2, 3, 10), rows(-1, -2, -3, -10), [("a", 0, 3), ("b", 3, 4)])
    assert first["prev_hidden"].flatten().tolist() == [0, 1, 2, 0]
    assert first["prev_moe_output"].flatten().tolist() == [0, -1, -2, 0]
    assert first["moe_output"].flatten().tolist() == [-1, -2, -3, -10]
    # Step 2: one decode row each, in the other order; the previous token ran in step 1.
    second = tokens.context(0, rows(11, 4), rows(-11, -4), [("b", 0, 1), ("a", 1, 2)])
    assert second["prev_hidden"].flatten().tolist() == [10, 3]
    assert second["prev_moe_output"].flatten().tolist() == [-10, -3]


def test_layers_are_kept_apart_and_finished_requests_forgotten():
    tokens = PreviousTokens()
    tokens.context(0, rows(1), rows(1), [("a", 0, 1)])
    tokens.context(1, rows(5), rows(5), [("a", 0, 1)])
    assert tokens.context(1, rows(6), rows(6), [("a", 0, 1)])["prev_hidden"].item() == 5
    tokens.forget(["a"])
    assert tokens.context(0, rows(2), rows(2), [("a", 0, 1)])["prev_hidden"].item() == 0


def test_unknown_rows_get_no_previous_token():
    tokens = PreviousTokens()
    context = tokens.context(0, rows(1, 2), rows(3, 4), None)
    assert context["prev_hidden"].abs().sum() == 0 and context["prev_moe_output"].abs().sum() == 0
