"""Reading router (gate) weights straight from a Hugging Face checkpoint folder.

The predictors need every MoE layer's gate at start-up and offline; vLLM's CPU build empties
gate weights after prepacking, so they are read from the safetensors files instead.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re

import torch
from safetensors import safe_open

# A MoE block's router, whatever the family calls the block: `mlp.gate` (Qwen, DeepSeek,
# OLMoE, GLM), `block_sparse_moe.gate` (Mixtral, Phi-MoE), `feed_forward.router` (Llama-4),
# `mlp.router` (gpt-oss). Not `shared_expert_gate` (Qwen2-MoE), not a dense MLP's `gate_proj`.
_GATE_KEY = re.compile(
    r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\."
    r"(?:mlp|block_sparse_moe|feed_forward)\.(?:gate|router)\.weight$"
)


def load_gate_weights(model_dir: str) -> dict[int, torch.Tensor]:
    """`{layer: [num_experts, hidden]}` for every MoE layer of the checkpoint."""
    gates = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                match = _GATE_KEY.match(key)
                if match:
                    gates[int(match.group(1))] = f.get_tensor(key)
    if not gates:
        raise ValueError(
            f"expertflow: no MoE router weights (e.g. model.layers.N.mlp.gate.weight or "
            f"model.layers.N.block_sparse_moe.gate.weight) in {model_dir}"
        )
    return gates


# Set by `vllm-expertflow widen-model` in the config of a checkpoint whose experts were widened
# without changing what they compute: {"model": ..., "config_hash": ..., "factor": N}.
WIDENED_FROM_KEY = "expertflow_widened_from"
# Set by `vllm-expertflow quantize`: only the experts were quantized, the routers are the
# original's, so its predictors and traces serve the quantized model: {"model", "config_hash"}.
QUANTIZED_FROM_KEY = "expertflow_quantized_from"


def routing_config_hash(model_dir: str) -> str:
    """Identifies the model whose routing a checkpoint has: predictors and traces are valid only
    for it. The hash of its config.json, or for a widened or quantized checkpoint, of the
    original's (recorded when it was made, itself resolved the same way)."""
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        raw = f.read()
    config = json.loads(raw)
    for key in (WIDENED_FROM_KEY, QUANTIZED_FROM_KEY):
        if key in config:
            return config[key]["config_hash"]
    return hashlib.sha256(raw).hexdigest()


def tensor_bytes(model_dir: str) -> dict[str, int]:
    """Every tensor of the checkpoint's safetensors files and its size in bytes, read from the
    files' headers (no tensor data is read)."""
    sizes = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        for name, entry in safetensors_header(path)[0].items():
            start, end = entry["data_offsets"]
            sizes[name] = end - start
    return sizes


def safetensors_header(path: str) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensors (`dtype`, `shape`, `data_offsets` each) and where its data
    starts: offsets count from there."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


# Routed experts' tensors, whatever the family calls them: `...experts.N.w1` (Mixtral),
# `...experts.gate_up_proj` (Llama-4, gpt-oss), `block_sparse_moe.input_linear` (Granite-MoE).
# Not shared experts (`shared_expert.`, `shared_experts.`).
_EXPERT_TENSOR = re.compile(r"\.experts\.|\.block_sparse_moe\.(?:input|output)_linear\.")


def is_expert_tensor(name: str) -> bool:
    return _EXPERT_TENSOR.search(name) is not None
