import json

import pytest
import torch
from safetensors.torch import save_file

from vllm_expertflow.core.checkpoint import (
    QUANTIZED_FROM_KEY,
    WIDENED_FROM_KEY,
    load_gate_weights,
    routing_config_hash,
)


@pytest.mark.parametrize(
    "router",
    [
        "model.layers.{}.mlp.gate.weight",
        "model.layers.{}.block_sparse_moe.gate.weight",
        "model.layers.{}.feed_forward.router.weight",
        "model.layers.{}.mlp.router.weight",
        "language_model.model.layers.{}.feed_forward.router.weight",
    ],
)
def test_routers_are_found_under_each_familys_names(tmp_path, router):
    tensors = {router.format(layer): torch.full((4, 8), float(layer)) for layer in (1, 3)}
    # Not routers: a shared expert's gate and a dense MLP's gate projection.
    tensors["model.layers.1.mlp.shared_expert_gate.weight"] = torch.zeros(1, 8)
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(16, 8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    gates = load_gate_weights(str(tmp_path))
    assert sorted(gates) == [1, 3] and gates[3].shape == (4, 8) and gates[3][0, 0] == 3


def test_a_checkpoint_without_routers_is_refused_in_one_line(tmp_path):
    save_file(
        {"model.layers.0.mlp.gate_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "m.safetensors")
    )
    with pytest.raises(ValueError, match="no MoE router weights"):
        load_gate_weights(str(tmp_path))


@pytest.mark.parametrize("key", [WIDENED_FROM_KEY, QUANTIZED_FROM_KEY])
def test_a_derived_checkpoint_has_its_originals_routing_hash(tmp_path, key):
    original, derived, other = (tmp_path / name for name in ("original", "derived", "other"))
    for folder in (original, derived, other):
        folder.mkdir()
    (original / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (other / "config.json").write_text(json.dumps({"hidden_size": 16}))
    origin = {"model": "original", "config_hash": routing_config_hash(str(original))}
    (derived / "config.json").write_text(json.dumps({"hidden_size": 8, "q": 1, key: origin}))
    assert routing_config_hash(str(derived)) == routing_config_hash(str(original))
    assert routing_config_hash(str(other)) != routing_config_hash(str(original))
