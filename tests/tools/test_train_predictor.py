import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from vllm_expertflow.cli import main
from vllm_expertflow.core.predictor import LearnedPredictor, TransitionPredictor, load_predictor
from vllm_expertflow.core.tracer import RoutingTracer
from vllm_expertflow.tools.trace import model_metadata
from vllm_expertflow.tools.train_predictor import split_by_request

LAYERS, E, K, H = [0, 1, 2], 8, 2, 16


@pytest.fixture
def model_dir(tmp_path):
    """A checkpoint folder with just a config and the gates of three MoE layers."""
    directory = tmp_path / "model"
    directory.mkdir()
    config = {
        "model_type": "qwen3_moe",
        "num_hidden_layers": 3,
        "num_experts": E,
        "num_experts_per_tok": K,
        "hidden_size": H,
    }
    (directory / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    gates = {f"model.layers.{i}.mlp.gate.weight": torch.randn(E, H, generator=g) for i in LAYERS}
    save_file(gates, str(directory / "model.safetensors"))
    return directory


def make_trace(directory, model_dir, requests: int, seed: int, layers=LAYERS):
    """Tokens drift slowly across layers, so each layer's router sees a close cousin of the last."""
    gates = load_gates(model_dir)
    # The worker adds the MoE layers' ids to the trace tool's metadata.
    metadata = {**model_metadata(model_dir), "layers": list(layers)}
    tracer = RoutingTracer(str(directory), metadata, max_tokens=10**6)
    g = torch.Generator().manual_seed(seed)
    for _ in range(requests):
        hidden = torch.randn(20, H, generator=g)
        for layer in layers:
            routed = (hidden @ gates[layer].T).topk(K).indices
            tracer.record(layer, hidden, routed, torch.tanh(hidden))
            hidden = hidden + 0.3 * torch.randn(20, H, generator=g)
    tracer.close()


def load_gates(model_dir):
    from vllm_expertflow.core.checkpoint import load_gate_weights

    return load_gate_weights(str(model_dir))


def test_split_by_request_never_splits_a_request():
    tensors = {"request_ids": torch.arange(50).repeat_interleave(4), "x": torch.arange(200)}
    train, held = split_by_request(tensors, 0.1, seed=0)
    assert len(held["x"]) == 20 and len(train["x"]) == 180
    assert not set(train["request_ids"].tolist()) & set(held["request_ids"].tolist())


@pytest.mark.parametrize("kind", ["learned", "transition"])
def test_train_predictor_writes_a_loadable_file(tmp_path, model_dir, kind, caplog):
    make_trace(tmp_path / "train", model_dir, requests=30, seed=0)
    out = tmp_path / "p.safetensors"
    args = ["train-predictor", "--traces", str(tmp_path / "train"), "--out", str(out)]
    with caplog.at_level(logging.INFO):
        assert main([*args, "--kind", kind, "--epochs", "2"]) == 0
    predictor = load_predictor(str(out), model_metadata(model_dir)["config_hash"])
    expected = LearnedPredictor if kind == "learned" else TransitionPredictor
    assert isinstance(predictor, expected) and predictor.max_depth == 2
    assert "held-out recall@2 at depth 1" in caplog.text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("kind", ["learned", "transition"])
def test_depth_is_capped_by_the_model_s_moe_layers(tmp_path, model_dir, kind, caplog):
    # Two MoE layers (1 and 2, a dense first layer): depth 1 is the only layer pair.
    make_trace(tmp_path / "train", model_dir, requests=30, seed=0, layers=[1, 2])
    out = tmp_path / "p.safetensors"
    args = ["train-predictor", "--traces", str(tmp_path / "train"), "--out", str(out)]
    with caplog.at_level(logging.INFO):
        assert main([*args, "--kind", kind, "--epochs", "1", "--max-depth", "3"]) == 0
    assert load_predictor(str(out), model_metadata(model_dir)["config_hash"]).max_depth == 1
    assert "--max-depth 3 is deeper than this model's 2 MoE layers allow" in caplog.text
    assert "held-out recall@2 at depth 1" in caplog.text
    assert "nan" not in caplog.text


def test_eval_predictors_writes_results(tmp_path, model_dir, capsys):
    make_trace(tmp_path / "train", model_dir, requests=30, seed=0)
    make_trace(tmp_path / "eval", model_dir, requests=10, seed=1)
    learned = tmp_path / "learned.safetensors"
    train = ["--traces", str(tmp_path / "train"), "--eval-traces", str(tmp_path / "eval")]
    assert main(["train-predictor", *train, "--out", str(learned), "--epochs", "1"]) == 0
    out = tmp_path / "results"
    assert (
        main(
            [
                "eval-predictors",
                "--model",
                str(model_dir),
                "--train-traces",
                str(tmp_path / "train"),
                "--eval-traces",
                str(tmp_path / "eval"),
                "--learned",
                str(learned),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    runs = [row["run"] for row in results["replay"]]
    assert runs[:3] == ["lru", "lfu", "static"] and runs[-1] == "belady"
    assert {"gate-d1", "transition-d2", "learned-d1", "learned-d2"} <= set(runs)
    assert results["num_slots"] == 6  # ceil(0.25 * 3 layers * 8 experts)
    belady = results["replay"][-1]["stalls"]
    assert all(row["stalls"] >= belady for row in results["replay"] if row["run"] in ("lru", "lfu"))
    assert "| predictor |" in capsys.readouterr().out
