import torch

from vllm_expertflow.core.routing_log import RoutingLog


def test_collect_returns_each_layers_experts_once_and_clears():
    log = RoutingLog([3, 7], num_experts=8, device="cpu")
    log.record(3, torch.tensor([[5, 1], [1, 0]], dtype=torch.int32))
    log.record(7, torch.tensor([[6, 2]]))
    log.record(3, torch.tensor([[4, 5]]))  # a second chunk of the same layer adds to it
    assert log.collect() == {3: [0, 1, 4, 5], 7: [2, 6]}
    assert log.collect() == {}
    log.record(7, torch.tensor([[3, 3]]))
    assert log.collect() == {7: [3]}
