"""Tests for `vllm-expertflow widen-model`: wider experts, the same function and routing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from vllm_expertflow.core.checkpoint import load_gate_weights, routing_config_hash
from vllm_expertflow.tools.tiny_moe import build_tiny_moe
from vllm_expertflow.tools.widen_model import WidenError, widen_checkpoint, widen_tensor

FACTOR = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("widen")
    original = build_tiny_moe("qwen3_moe", root / "original", seed=3)
    return original, widen_checkpoint(original, FACTOR, root / "widened")


def _routing_and_tokens(model_dir: Path, prompt: torch.Tensor) -> tuple[dict, list[int]]:
    """Every MoE layer's top-k expert sets for the prompt's tokens, and 8 greedy tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gates = load_gate_weights(str(model_dir))
    top_k = model.config.num_experts_per_tok
    router_inputs: dict[int, torch.Tensor] = {}
    hooks = [
        model.model.layers[layer].mlp.register_forward_pre_hook(
            lambda module, args, layer=layer: router_inputs.setdefault(layer, args[0])
        )
        for layer in gates
    ]
    with torch.no_grad():
        model(prompt)
    for hook in hooks:
        hook.remove()
    routing = {
        layer: (router_inputs[layer].reshape(-1, gate.shape[1]) @ gate.float().T)
        .topk(top_k)
        .indices.sort()
        .values
        for layer, gate in gates.items()
    }
    tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1] :]
    return routing, tokens.tolist()


def test_widened_model_keeps_routing_and_tokens(models: tuple[Path, Path]) -> None:
    original, widened = models
    prompt = torch.randint(2, 4096, (1, 24), generator=torch.Generator().manual_seed(0))
    routing, tokens = _routing_and_tokens(original, prompt)
    widened_routing, widened_tokens = _routing_and_tokens(widened, prompt)
    assert routing.keys() == widened_routing.keys() == {1, 2}
    for layer in routing:
        assert torch.equal(routing[layer], widened_routing[layer]), f"layer {layer}"
    assert tokens == widened_tokens


def test_widened_experts_are_wider_and_the_rest_is_untouched(models: tuple[Path, Path]) -> None:
    original, widened = models
    before, after = (
        load_file(original / "model.safetensors"),
        load_file(widened / "model.safetensors"),
    )
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        if ".experts." in name and ("gate_proj" in name or "up_proj" in name):
            assert after[name].shape == (tensor.shape[0] * FACTOR, tensor.shape[1])
        elif ".experts." in name and "down_proj" in name:
            assert after[name].shape == (tensor.shape[0], tensor.shape[1] * FACTOR)
        else:
            assert torch.equal(after[name], tensor), name
    config = json.loads((widened / "config.json").read_text())
    assert config["moe_intermediate_size"] == 64 * FACTOR
    assert config["intermediate_size"] == 128  # the dense first layer is not an expert


def test_predictors_of_the_original_serve_the_widened_model(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    original, widened = models
    assert routing_config_hash(str(widened)) == routing_config_hash(str(original))
    twice = widen_checkpoint(widened, 2, tmp_path / "twice")
    assert routing_config_hash(str(twice)) == routing_config_hash(str(original))
    assert json.loads((twice / "config.json").read_text())["expertflow_widened_from"]["factor"] == 8
    other = build_tiny_moe("qwen3_moe", tmp_path / "other", seed=4)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 32}))
    assert routing_config_hash(str(other)) != routing_config_hash(str(original))


def test_refuses_when_the_disk_cannot_hold_it(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, _ = models
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(WidenError, match=r"needs \d+ bytes but .* has 1000 bytes free"):
        widen_checkpoint(original, FACTOR, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_checkpoint_quantized_other_than_packed_int4(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    original, _ = models
    copy = tmp_path / "quantized"
    shutil.copytree(original, copy)
    config = json.loads((copy / "config.json").read_text())
    fp8 = {"format": "float-quantized", "config_groups": {"g": {"weights": {"num_bits": 8}}}}
    (copy / "config.json").write_text(json.dumps({**config, "quantization_config": fp8}))
    with pytest.raises(WidenError, match="quantized otherwise"):
        widen_checkpoint(copy, FACTOR, tmp_path / "out")


def test_agreement_compares_routing_only_where_both_models_were_fed_the_same_tokens():
    from vllm_expertflow.tools.widen_model import agreement

    # One request: 2 prompt rows, then the generated tokens fed back (the last one is not).
    def trace(topk: list[list[int]]) -> dict:
        return {
            "request_ids": torch.zeros(len(topk), dtype=torch.int32),
            "positions": torch.arange(len(topk), dtype=torch.int32),
            "topk_ids.0": torch.tensor(topk),
        }

    tokens_a, tokens_b = [[5, 6, 7]], [[5, 9, 7]]  # the second generated token differs
    trace_a = trace([[0, 1], [2, 3], [1, 0], [4, 5]])
    trace_b = trace([[1, 0], [2, 7], [1, 0], [6, 6]])
    report = agreement(tokens_a, tokens_b, trace_a, trace_b, layers=[0])
    # Rows 0-2 saw the same tokens (prompt, then token 5); row 3 was fed 6 against 9.
    assert report["routing_decisions_compared"] == 3
    assert report["routing_decisions_identical"] == 2  # row 1 routed differently
    assert report["tokens_agreeing_before_the_first_difference"] == 1
    assert report["identical_generations"] == 0 and report["tokens"] == 3


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_widened_int4_expert_dequantizes_to_the_widened_dequantized_expert(symmetric):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from vllm_expertflow.core.int4 import Int4Packing

    group, hidden, inter = 32, 64, 96
    packing = Int4Packing(group, symmetric)
    generator = torch.Generator().manual_seed(3)

    def int4_projection(rows: int, cols: int) -> dict[str, torch.Tensor]:
        codes = torch.randint(0, 16, (rows, cols), generator=generator)
        tensors = {
            "weight_packed": pack_to_int32((codes - 8).to(torch.int8), 4),
            "weight_scale": (torch.rand(rows, cols // group, generator=generator) / 50).to(
                torch.bfloat16
            ),
            "weight_shape": torch.tensor([rows, cols]),
        }
        if not symmetric:
            zeros = torch.randint(0, 16, (rows, cols // group), generator=generator)
            tensors["weight_zero_point"] = pack_to_int32((zeros - 8).to(torch.int8), 4, 0)
        return tensors

    def dequantized(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        rows, cols = tensors["weight_shape"].tolist()
        out = torch.empty(rows, cols, dtype=torch.bfloat16)
        zero_point = tensors.get("weight_zero_point")
        return packing.dequantize(
            tensors["weight_packed"], tensors["weight_scale"], zero_point, out
        )

    for projection, rows, cols in (("up_proj", inter, hidden), ("down_proj", hidden, inter)):
        prefix = f"model.layers.0.mlp.experts.3.{projection}"
        original = int4_projection(rows, cols)
        widened = {
            part: widen_tensor(f"{prefix}.{part}", tensor, FACTOR)
            for part, tensor in original.items()
        }
        expected = widen_tensor(f"{prefix}.weight", dequantized(original), FACTOR)
        assert torch.equal(dequantized(widened), expected), projection


def test_zero_points_pack_as_compressed_tensors_packs_them():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from vllm_expertflow.core.int4 import Int4Packing

    zeros = torch.randint(0, 16, (20, 3))
    expected = pack_to_int32((zeros - 8).to(torch.int8), 4, packed_dim=0)
    assert torch.equal(Int4Packing.pack_zero_points(zeros), expected)
