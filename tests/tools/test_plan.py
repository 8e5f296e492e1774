"""`vllm-expertflow plan` end to end on a small routing file and a hand-written config."""

import json

import numpy as np
import pytest

from vllm_expertflow.cli import main
from vllm_expertflow.tools.plan import decode_batches

LAYERS, E, K = [1, 3, 5, 7], 8, 2  # MoE on every other layer: real ids, not positions
CONFIG = {
    "model_type": "llama4_text",
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "intermediate_size_mlp": 4096,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 32000,
    "num_local_experts": E,
    "num_experts_per_tok": K,
    "interleave_moe_layer_step": 2,
}


@pytest.fixture
def inputs(tmp_path):
    generator = np.random.default_rng(0)
    skew = generator.random(E) ** 2 + 0.05
    topk = np.stack(
        [
            np.stack([generator.choice(E, K, replace=False, p=skew / skew.sum()) for _ in LAYERS])
            for _ in range(240)
        ]
    )
    routing = tmp_path / "routing.npz"
    np.savez(routing, layers=LAYERS, topk_ids=topk, request_ids=np.repeat(np.arange(12), 20))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    return routing, config


def plan(routing, config, out, *extra) -> int:
    return main(
        ["plan", "--trace", str(routing), "--model-shape", str(config), "--out", str(out), *extra]
    )


def test_plan_writes_a_row_per_budget_policy_and_batch(inputs, tmp_path):
    routing, config = inputs
    out = tmp_path / "plan"
    assert (
        plan(
            routing,
            config,
            out,
            "--hardware",
            "rtx4090",
            "--budgets",
            "0.25,0.5",
            "--batches",
            "1,4",
            "--policies",
            "lru-ondemand",
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert (out / "plan.png").stat().st_size > 0
    rows = results["rows"]
    keys = {
        "policy",
        "cache_fraction",
        "hit_rate",
        "loads",
        "loads_vs_belady",
        "stall_share",
        "tokens_per_s",
    }
    assert all(keys <= row.keys() for row in rows)
    for batch in (1, 4):
        mine = [r for r in rows if r["batch"] == batch]
        resident = next(r for r in mine if r["policy"] == "all-resident")["tokens_per_s"]
        for budget in (0.25, 0.5):
            lru, belady = (
                next(r for r in mine if r["policy"] == p and r["cache_fraction"] == budget)
                for p in ("lru-ondemand", "belady")
            )
            assert belady["loads_vs_belady"] == 1.0 <= lru["loads_vs_belady"]
            # Demand loads only: each costs its transfer, so fewer loads decode faster.
            assert resident > belady["tokens_per_s"] >= lru["tokens_per_s"] > 0
            assert 0 < lru["stall_share"] < 1


def test_a_shape_that_does_not_match_the_trace_is_refused_in_one_line(inputs, tmp_path, capsys):
    routing, config = inputs
    config.write_text(json.dumps({**CONFIG, "num_local_experts": 16}))
    assert plan(routing, config, tmp_path / "plan", "--hardware", "rtx4090") == 2
    message = capsys.readouterr().out.strip()
    assert "\n" not in message and "give a trace (or .npz) of this model" in message

    # --fit-trace maps the routing onto the shape; a predictor of the traced model cannot come.
    fitted = tmp_path / "fitted"
    assert plan(routing, config, fitted, "--hardware", "rtx4090", "--fit-trace") == 0
    results = json.loads((fitted / "results.json").read_text())
    assert {r["policy"] for r in results["rows"]} >= {"lru-ondemand", "belady"}
    refused = ["--fit-trace", "--policies", "transition", "--predictor", str(routing)]
    assert plan(routing, config, fitted, "--hardware", "rtx4090", *refused) == 2
    assert "cannot run on a fitted trace" in capsys.readouterr().out


def test_a_hardware_file_replaces_the_presets(inputs, tmp_path):
    routing, config = inputs
    slow = {
        "name": "slow-link",
        "link_gbps": 0.5,
        "link_latency_us": 100.0,
        "io_queues": 1,
        "memory_gbps": 500.0,
        "tflops": 50.0,
        "memory_gib": 24.0,
    }
    hardware = tmp_path / "hw.json"
    hardware.write_text(json.dumps(slow))
    assert plan(routing, config, tmp_path / "slow", "--hardware", str(hardware)) == 0
    assert plan(routing, config, tmp_path / "fast", "--hardware", "rtx4090") == 0

    def lru(out):
        rows = json.loads((out / "results.json").read_text())["rows"]
        return next(r for r in rows if r["policy"] == "lru-ondemand")

    assert lru(tmp_path / "slow")["loads"] == lru(tmp_path / "fast")["loads"]
    assert lru(tmp_path / "slow")["tokens_per_s"] < lru(tmp_path / "fast")["tokens_per_s"]


def test_decode_batches_interleave_requests():
    request_ids = np.array([0, 0, 0, 1, 1, 2])
    import torch

    assert decode_batches(torch.from_numpy(request_ids), 2) == [[0, 3], [1, 4], [2], [5]]


def gated_model_and_trace(tmp_path) -> tuple:
    """A checkpoint folder with CONFIG and a router per MoE layer, and a trace recorded under
    its config hash whose routing follows those routers (hidden states included)."""
    import torch
    from safetensors.torch import save_file

    from vllm_expertflow.core.checkpoint import routing_config_hash
    from vllm_expertflow.core.tracer import RoutingTracer

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG))
    hidden_size = 16
    gen = torch.Generator().manual_seed(0)
    gates = {layer: torch.randn(E, hidden_size, generator=gen) for layer in LAYERS}
    save_file(
        {f"model.layers.{layer}.feed_forward.router.weight": g for layer, g in gates.items()},
        str(model / "model.safetensors"),
    )
    metadata = {
        "model": str(model),
        "config_hash": routing_config_hash(str(model)),
        "layers": LAYERS,
        "num_experts": E,
        "top_k": K,
        "hidden_size": hidden_size,
    }
    tracer = RoutingTracer(str(tmp_path / "trace"), metadata, max_tokens=200)
    state = torch.randn(200, hidden_size, generator=gen)
    for start in range(0, 200, 20):  # ten requests of twenty tokens
        rows = slice(start, start + 20)
        for layer in LAYERS:
            topk = (state[rows] @ gates[layer].T).topk(K, dim=-1).indices
            tracer.record(layer, state[rows], topk, state[rows])
    tracer.close()
    return model, tmp_path / "trace"


def test_gate_plans_with_the_traced_models_routers_and_refuses_another_model(
    inputs, tmp_path, capsys
):
    model, trace = gated_model_and_trace(tmp_path)
    _, config = inputs
    common = ["--hardware", "rtx4090", "--budgets", "0.25", "--policies", "gate,lru-ondemand"]
    out = tmp_path / "plan"
    assert plan(trace, config, out, *common, "--gate-model", str(model)) == 0
    rows = {r["policy"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    # The routers are the routing's own, so gate's prefetches turn LRU's misses into hits.
    assert rows["gate"]["hit_rate"] > rows["lru-ondemand"]["hit_rate"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**CONFIG, "vocab_size": 1}))
    capsys.readouterr()
    assert plan(trace, config, tmp_path / "refused", *common, "--gate-model", str(other)) == 2
    assert capsys.readouterr().out.count("not the model the trace was recorded from") == 1
    assert plan(trace, config, tmp_path / "refused", *common) == 2
    assert "gate needs --gate-model DIR" in capsys.readouterr().out
