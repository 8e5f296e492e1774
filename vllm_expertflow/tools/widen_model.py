"""`vllm-expertflow widen-model`: a checkpoint whose routed experts are N times wider and compute
the same function, so speed can be measured on experts of a real model's size with the small
model's trained routing.

An expert computes down(act(gate(x)) * up(x)). Repeating every row of gate and up N times makes
each hidden neuron appear N times; repeating down's columns N times and dividing them by N sums
those copies back to the original value. Router, attention, embeddings and shared experts are
untouched, so routing (and every predictor trained on the original) stays valid: the config
records `expertflow_widened_from`, which `routing_config_hash` reads.

An int4 checkpoint (`vllm-expertflow quantize`) widens the same way without requantizing: its
codes, zero points and group scales are repeated like the weights (down's groups run along the
repeated columns, so every new group is a copy of an old one) and down's scales are divided
by N. With a power-of-two N the widened model dequantizes to exactly the widened dequantized
original.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vllm_expertflow.core.checkpoint import WIDENED_FROM_KEY, routing_config_hash, tensor_bytes
from vllm_expertflow.core.files import atomic_path, write_text_atomically
from vllm_expertflow.core.int4 import Int4Packing

logger = logging.getLogger(__name__)

# Routed experts stored one tensor per projection: Qwen/DeepSeek/OLMoE names, then Mixtral's;
# a bf16 `weight`, or int4's packed codes, group scales, zero points and logical shape.
_PARTS = r"\.(weight|weight_packed|weight_scale|weight_zero_point|weight_shape)$"
_ROWS_REPEATED = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|w1|w3)" + _PARTS)
_COLUMNS_REPEATED = re.compile(r"\.experts\.\d+\.(down_proj|w2)" + _PARTS)


class WidenError(ValueError):
    """A checkpoint this tool cannot widen, or an output that cannot be written."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="a local HF checkpoint folder")
    parser.add_argument("--factor", type=int, required=True, help="widen each expert N times")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--check",
        action="store_true",
        help="then run both models through vLLM (greedy, held-out prompts) and write how many "
        "tokens and routing decisions agree to OUT/widening_check.json",
    )


def run(args: argparse.Namespace) -> int:
    try:
        widen_checkpoint(args.model, args.factor, args.out)
    except WidenError as error:
        print(error)
        return 2
    if args.check:
        report = compare_models(args.model, args.out)
        write_text_atomically(args.out / "widening_check.json", json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
    return 0


def expert_size_key(config: dict) -> str:
    """The config key holding the routed experts' intermediate size."""
    if "moe_intermediate_size" in config:
        return "moe_intermediate_size"
    if "intermediate_size" in config and ("num_local_experts" in config or "num_experts" in config):
        return "intermediate_size"
    raise WidenError(
        "expertflow: widen-model found no routed-expert size (moe_intermediate_size or "
        "intermediate_size with num_local_experts) in the model's config.json"
    )


def widen_tensor(name: str, tensor: torch.Tensor, factor: int) -> torch.Tensor:
    """The tensor of the widened model under `name`: routed-expert projections widened."""
    rows = _ROWS_REPEATED.search(name)
    columns = _COLUMNS_REPEATED.search(name)
    if not (rows or columns):
        return tensor
    part = (rows or columns).group(2)
    if part == "weight_shape":
        return tensor * torch.tensor([factor, 1] if rows else [1, factor], dtype=tensor.dtype)
    if part == "weight_zero_point":
        # Packed eight rows per word: unpacked, widened like the scales, packed again.
        zero_points = Int4Packing.unpack_zero_points(tensor, tensor.shape[0] * 8)
        widened = zero_points.repeat(factor, 1) if rows else zero_points.repeat(1, factor)
        return Int4Packing.pack_zero_points(widened)
    if rows:
        return tensor.repeat(factor, 1)
    if part in ("weight", "weight_scale"):
        # Divide in float32, then round once: a power-of-two factor is exact in bf16.
        return (tensor.float().repeat(1, factor) / factor).to(tensor.dtype)
    return tensor.repeat(1, factor)  # packed codes: whole words, as the row length is a multiple


def _is_packed_int4(quantization: dict) -> bool:
    groups = quantization.get("config_groups") or {}
    return quantization.get("format") == "pack-quantized" and all(
        (group.get("weights") or {}).get("num_bits") == 4 for group in groups.values()
    )


def widen_checkpoint(model_dir: Path, factor: int, out: Path) -> Path:
    """Writes the widened checkpoint to `out` (all or nothing); returns `out`."""
    if factor < 1:
        raise WidenError(f"expertflow: --factor must be 1 or more, got {factor}")
    config = json.loads((model_dir / "config.json").read_text())
    quantization = config.get("quantization_config")
    if quantization is not None and not _is_packed_int4(quantization):
        raise WidenError(
            f"expertflow: widen-model reads bf16/fp16 checkpoints and int4 ones written by "
            f"`vllm-expertflow quantize`; {model_dir} is quantized otherwise (widen the "
            "unquantized model, then quantize the result)"
        )
    size_key = expert_size_key(config)
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise WidenError(f"expertflow: no *.safetensors files in {model_dir}")
    sizes = tensor_bytes(str(model_dir))
    widened_names = [n for n in sizes if _ROWS_REPEATED.search(n) or _COLUMNS_REPEATED.search(n)]
    if not widened_names:
        raise WidenError(
            f"expertflow: widen-model found no per-expert gate/up/down (or w1/w3/w2) tensors in "
            f"{model_dir}; checkpoints that store experts fused are not supported"
        )
    needed = sum(sizes.values()) + sum(sizes[name] for name in widened_names) * (factor - 1)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise WidenError(
            f"expertflow: the widened checkpoint needs {needed} bytes but {parent} has {free} "
            "bytes free; free space or choose a smaller --factor or another --out"
        )
    widened_config = {
        **config,
        size_key: config[size_key] * factor,
        WIDENED_FROM_KEY: {
            "model": model_dir.name,
            "config_hash": routing_config_hash(str(model_dir)),
            "factor": factor * config.get(WIDENED_FROM_KEY, {}).get("factor", 1),
        },
    }
    with atomic_path(out) as tmp:
        os.makedirs(tmp)
        for path in model_dir.iterdir():
            if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
                shutil.copy2(path, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(widened_config, f, indent=2)
        for shard in shards:
            tensors = {}
            with safe_open(str(shard), framework="pt") as f:
                for name in tqdm(list(f.keys()), desc=f"widening {shard.name}", unit="tensor"):
                    tensors[name] = widen_tensor(name, f.get_tensor(name), factor).contiguous()
                metadata = f.metadata()
            save_file(tensors, os.path.join(tmp, shard.name), metadata=metadata)
    logger.info("expertflow: wrote %s (experts %dx wider, %d bytes)", out, factor, needed)
    return out


def compare_models(
    original: Path, widened: Path, num_prompts: int = 8, max_tokens: int = 32
) -> dict:
    """Greedy tokens and every MoE layer's routing of both models on the same held-out prompts,
    through the real engine (every expert resident: stock's tokens). Routing is compared where
    both models have seen the same tokens so far (up to a request's first differing token)."""
    import tempfile

    from vllm_expertflow.core.tracer import read_trace
    from vllm_expertflow.tools.engine_runs import greedy_params, held_out_prompts, open_engine
    from vllm_expertflow.tools.trace import model_metadata

    prompts = held_out_prompts(original, num_prompts)
    runs = []
    with tempfile.TemporaryDirectory() as root:
        for model in (original, widened):
            trace_dir = os.path.join(root, model.name)
            options = {"cache_fraction": 1.0}
            with open_engine("expertflow", options, model, enforce_eager=False) as llm:
                metadata = model_metadata(model)
                llm.collective_rpc(
                    "expertflow_start_tracing", args=(trace_dir, metadata, 10**9, 1.0, 0)
                )
                outputs = llm.generate(prompts, greedy_params(max_tokens), use_tqdm=False)
                llm.collective_rpc("expertflow_stop_tracing")
            runs.append(([list(o.outputs[0].token_ids) for o in outputs], *read_trace(trace_dir)))
    (tokens_a, manifest, trace_a), (tokens_b, _, trace_b) = runs
    return {
        "original": str(original),
        "widened": str(widened),
        "prompts": len(prompts),
        "tokens_per_prompt": max_tokens,
        **agreement(tokens_a, tokens_b, trace_a, trace_b, manifest["layers"]),
    }


def agreement(
    tokens_a: list[list[int]],
    tokens_b: list[list[int]],
    trace_a: dict[str, torch.Tensor],
    trace_b: dict[str, torch.Tensor],
    layers: list[int],
) -> dict:
    """How many generated tokens, and routing decisions of rows both models were fed the same
    tokens for, agree. Request i of each trace is prompt i; its last generated token is not fed."""
    same_until = [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
        for x, y in zip(tokens_a, tokens_b, strict=True)
    ]
    rows_b = _rows_by_request_position(trace_b)
    fed = trace_a["request_ids"].bincount(minlength=len(tokens_a)).tolist()
    prompt_lengths = [n - (len(tokens) - 1) for n, tokens in zip(fed, tokens_a, strict=False)]
    compared = agreed = 0
    for (request, position), row_a in _rows_by_request_position(trace_a).items():
        same = prompt_lengths[request] + same_until[request]
        if position >= same or (request, position) not in rows_b:
            continue  # the models were fed different tokens from here on
        for layer in layers:
            ids_a = trace_a[f"topk_ids.{layer}"][row_a].sort().values
            ids_b = trace_b[f"topk_ids.{layer}"][rows_b[(request, position)]].sort().values
            compared += 1
            agreed += bool(torch.equal(ids_a, ids_b))
    return {
        "identical_generations": sum(a == b for a, b in zip(tokens_a, tokens_b, strict=True)),
        "tokens_agreeing_before_the_first_difference": sum(same_until),
        "tokens": sum(len(tokens) for tokens in tokens_a),
        "routing_decisions_compared": compared,
        "routing_decisions_identical": agreed,
    }


def _rows_by_request_position(tensors: dict[str, torch.Tensor]) -> dict[tuple[int, int], int]:
    pairs = zip(tensors["request_ids"].tolist(), tensors["positions"].tolist(), strict=True)
    return {pair: row for row, pair in enumerate(pairs)}
