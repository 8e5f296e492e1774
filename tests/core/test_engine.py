"""The engine's explicit lifecycle: layers, store, build, forwards, reconfigure."""

import pytest
import torch
from test_moe_step import HIDDEN, INTER, NUM_EXPERTS, routing, silu_experts, slot_kernel

from vllm_expertflow.core.config import ExpertFlowConfig, ExpertFlowConfigError
from vllm_expertflow.core.engine import OffloadEngine
from vllm_expertflow.core.store import RamStore

LAYERS = (3, 7)  # MoE layers need not start at 0 nor be contiguous


def make_engine(options: dict) -> tuple[OffloadEngine, dict[int, dict[str, torch.Tensor]]]:
    opened = []

    def make_store(num_experts: int, store_format: str) -> RamStore:
        opened.append(store_format)
        return RamStore(num_experts, pin_memory=False)

    engine = OffloadEngine(
        ExpertFlowConfig.from_dict(options), torch.device("cpu"), make_store, "unused"
    )
    torch.manual_seed(0)
    weights = {}
    for layer in LAYERS:
        engine.add_layer(layer, NUM_EXPERTS, 2, slot_kernel, "test layout")
        weights[layer] = {
            "w13": torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN, dtype=torch.float64),
            "w2": torch.randn(NUM_EXPERTS, HIDDEN, INTER, dtype=torch.float64),
        }
        engine.store.write_layer(layer, weights[layer])
    assert opened == ["test layout"]  # the first layer opens the store, once
    return engine, weights


def test_build_then_forwards_give_the_dense_output_on_real_layer_ids():
    engine, weights = make_engine({"cache_experts": 4})
    assert engine.pool is None and engine.layers == [3, 7]
    engine.build()
    assert engine.pool.num_slots == 4 and engine.pool.device_table.layers == [3, 7]
    for seed in range(3):
        engine.forward_started(spans_of=None, finished=set())
        x, topk_weights, topk_ids = routing(num_tokens=3, seed=seed)
        for layer in LAYERS:
            w = weights[layer]
            expected = silu_experts(x, w["w13"], w["w2"], topk_weights, topk_ids)
            assert torch.allclose(engine.run_layer(layer, x, topk_weights, topk_ids), expected)
    assert set(engine.stats.layers) == {3, 7}
    snapshot = engine.snapshot()
    assert snapshot["slots"] == 4 and snapshot["resident_slots"] == 4
    assert all(layer in LAYERS for layer, _ in snapshot["resident"])
    with pytest.raises(AssertionError, match="built twice"):
        engine.build()
    engine.close()


def test_build_refuses_a_layer_missing_from_the_store():
    engine, _ = make_engine({"cache_experts": 4})
    engine.add_layer(9, NUM_EXPERTS, 2, slot_kernel, "test layout")
    with pytest.raises(AssertionError, match=r"layers \[9\] were never written"):
        engine.build()


def test_layers_with_other_expert_counts_are_refused_in_one_line():
    engine, _ = make_engine({"cache_experts": 4})
    with pytest.raises(ExpertFlowConfigError, match="layer 9 has 6 experts"):
        engine.add_layer(9, 6, 2, slot_kernel, "test layout")


def test_reconfigure_rebuilds_the_pool_and_restarts_the_stats_keeping_the_store():
    engine, weights = make_engine({"cache_experts": 4})
    engine.build()
    store = engine.store
    x, topk_weights, topk_ids = routing(num_tokens=2, seed=5)
    engine.run_layer(3, x, topk_weights, topk_ids)
    engine.reconfigure({"cache_fraction": 1.0})
    assert engine.pool.num_slots == 2 * NUM_EXPERTS and engine.store is store
    assert engine.stats.layers == {}
    # A pool that holds every expert is filled at once: serving never misses.
    assert engine.pool.table.num_resident == 2 * NUM_EXPERTS
    for layer in LAYERS:  # on each layer's own experts (the kernel reads them in place)
        w = weights[layer]
        expected = silu_experts(x, w["w13"], w["w2"], topk_weights, topk_ids)
        assert torch.allclose(engine.run_layer(layer, x, topk_weights, topk_ids), expected)
    assert engine.pool.holds_every_expert and engine.pool.layer_views is not None
    assert engine.stats.total().misses == 0
    assert engine.stats.total().hits == 2 * topk_ids.unique().numel()
    engine.run_layer(3, x[:1], topk_weights[:1], topk_ids[:1])  # one token: its k experts
    assert engine.stats.total().hits == 2 * topk_ids.unique().numel() + topk_ids.shape[1]
    with pytest.raises(ExpertFlowConfigError, match="cannot change store"):
        engine.reconfigure({"store": "disk"})


def test_a_tracer_records_rows_by_request_from_the_forwards_spans(tmp_path):
    from vllm_expertflow.core.tracer import RoutingTracer, read_trace

    engine, _ = make_engine({"cache_fraction": 1.0})
    engine.build()
    engine.tracer = RoutingTracer(str(tmp_path), {"layers": list(LAYERS)}, max_tokens=100)
    # A prefill of two requests, then one decode step each, in vLLM's batch order.
    for spans in ([("a", 0, 2), ("b", 2, 5)], [("b", 0, 1), ("a", 1, 2)]):
        engine.forward_started(lambda spans=spans: spans, finished=set())
        x, topk_weights, topk_ids = routing(num_tokens=spans[-1][2], seed=len(spans))
        for layer in LAYERS:
            engine.run_layer(layer, x, topk_weights, topk_ids)
    engine.tracer.close()
    _, tensors = read_trace(str(tmp_path))
    assert tensors["request_ids"].tolist() == [0, 0, 1, 1, 1, 1, 0]
    assert tensors["positions"].tolist() == [0, 1, 0, 1, 2, 3, 2]


def test_request_spans_are_read_only_by_the_tracer_or_a_context_predictor(tmp_path):
    from vllm_expertflow.core.tracer import RoutingTracer

    engine, _ = make_engine({"cache_fraction": 1.0})
    engine.build()
    assert not engine.reads_request_spans
    engine.tracer = RoutingTracer(str(tmp_path), {"layers": list(LAYERS)}, max_tokens=10)
    assert engine.reads_request_spans
