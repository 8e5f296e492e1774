"""A model's bytes and MoE layers from its config alone, checked against published sizes."""

import json
from pathlib import Path

import pytest

from vllm_expertflow.core.model_shape import ModelFootprint, MoEShape

# The fields of the published configs that size a model (examples/shapes/, used by `plan`).
SHAPES = Path(__file__).resolve().parents[2] / "examples" / "shapes"
MIXTRAL_8X7B = json.loads((SHAPES / "mixtral-8x7b.json").read_text())
QWEN3_30B_A3B = json.loads((SHAPES / "qwen3-30b-a3b.json").read_text())


@pytest.mark.parametrize(
    "config, params_billions",
    [(MIXTRAL_8X7B, 46.7), (QWEN3_30B_A3B, 30.5)],  # the model cards' parameter counts
)
def test_bf16_bytes_match_the_published_parameter_counts(config, params_billions):
    footprint = ModelFootprint.of(config)
    total = footprint.all_experts_bytes + footprint.weight_bytes_besides_experts
    assert total / 2 / 1e9 == pytest.approx(params_billions, rel=0.02)
    assert (
        footprint.expert_bytes
        == 3
        * config["hidden_size"]
        * (config.get("moe_intermediate_size") or config["intermediate_size"])
        * 2
    )


def test_int4_experts_are_about_a_quarter():
    bf16, int4 = ModelFootprint.of(MIXTRAL_8X7B), ModelFootprint.of(MIXTRAL_8X7B, "int4")
    assert int4.expert_bytes / bf16.expert_bytes == pytest.approx(0.258, abs=0.002)


@pytest.mark.parametrize(
    "extra, moe_layers",
    [
        ({}, [0, 1, 2, 3]),
        ({"mlp_only_layers": [0]}, [1, 2, 3]),  # Qwen
        ({"first_k_dense_replace": 1}, [1, 2, 3]),  # DeepSeek, GLM
        ({"interleave_moe_layer_step": 2}, [1, 3]),  # Llama-4
        ({"moe_layers": [2]}, [2]),
    ],
)
def test_moe_layers_follow_each_family_s_keys(extra, moe_layers):
    config = {**MIXTRAL_8X7B, "num_hidden_layers": 4, **extra}
    assert list(ModelFootprint.of(config).moe_layers) == moe_layers
    assert MoEShape.of(config).num_experts == 8


def test_a_config_with_no_routed_experts_is_refused():
    dense = {k: v for k, v in MIXTRAL_8X7B.items() if k != "num_local_experts"}
    with pytest.raises(ValueError, match="no routed experts"):
        ModelFootprint.of(dense)
