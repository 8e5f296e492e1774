"""`vllm-expertflow quantize`: int4 GPTQ or AWQ experts, in a checkpoint vLLM loads.

The work runs in the quantization environment (`.venv-quant`, see quantize_oneshot.py for
why it is separate); this side checks the inputs first so a bad one costs one line, not a
traceback from another environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .quantize_oneshot import add_arguments

if TYPE_CHECKING:  # torch loads only where a command needs it
    import torch
    from compressed_tensors.quantization import QuantizationScheme

__all__ = ["add_arguments", "run", "quantization_python"]

QUANT_PYTHON_ENV = "VLLM_EXPERTFLOW_QUANT_PYTHON"
_DEFAULT_QUANT_VENV = Path(__file__).resolve().parents[2] / ".venv-quant"


class QuantizeError(ValueError):
    """A bad `quantize` input; the message names the fix."""


def quantization_python() -> str:
    """The quantization environment's interpreter: $VLLM_EXPERTFLOW_QUANT_PYTHON or .venv-quant."""
    python = os.environ.get(QUANT_PYTHON_ENV) or str(_DEFAULT_QUANT_VENV / "bin" / "python")
    if not os.access(python, os.X_OK):
        raise QuantizeError(
            f"quantize: no quantization environment at {python}; run ./setup.sh (it makes "
            f".venv-quant with llm-compressor) or set {QUANT_PYTHON_ENV}"
        )
    return python


def check_inputs(args: argparse.Namespace) -> None:
    config_path = args.model / "config.json"
    if not config_path.is_file():
        raise QuantizeError(f"quantize: {args.model} has no config.json; give a checkpoint folder")
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        raise QuantizeError(f"quantize: {args.model} is already quantized; give a bf16 checkpoint")
    missing = [str(p) for p in args.calibration if not p.is_file()]
    if missing:
        raise QuantizeError(f"quantize: calibration file(s) not found: {', '.join(missing)}")
    # An expert's width: `moe_intermediate_size` where the family also has dense MLPs (Qwen,
    # DeepSeek), `intermediate_size` where every MLP is MoE (Mixtral, OLMoE).
    expert_width_key = next(
        (k for k in ("moe_intermediate_size", "intermediate_size") if config.get(k)), None
    )
    sizes = {"hidden_size": config.get("hidden_size")}
    if expert_width_key:
        sizes[expert_width_key] = config[expert_width_key]
    bad = {name: size for name, size in sizes.items() if size and size % args.group_size}
    if args.group_size <= 0 or bad:
        raise QuantizeError(
            f"quantize: --group-size {args.group_size} must divide "
            + ", ".join(f"{name} ({size})" for name, size in sizes.items())
        )
    if args.out.resolve() == args.model.resolve():
        raise QuantizeError("quantize: --out must differ from --model")


def run(args: argparse.Namespace) -> int:
    try:
        check_inputs(args)
        python = quantization_python()
    except QuantizeError as error:
        print(error, file=sys.stderr)
        return 2
    # Run as a file, not a module: the other environment need not have this package.
    script = Path(__file__).with_name("quantize_oneshot.py")
    result = subprocess.run([python, str(script), *_oneshot_argv(args)])
    if result.returncode == 0:
        record_origin(args.model, args.out)
        size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
        print(f"quantize: wrote {args.out} ({size / 2**20:.1f} MiB of weights)")
    return result.returncode


def record_origin(model: Path, out: Path) -> None:
    """Names the model `out` was quantized from in its config, so the original's predictors and
    traces are accepted for it (the routers are not quantized) and no other model's are."""
    from vllm_expertflow.core.checkpoint import QUANTIZED_FROM_KEY, routing_config_hash
    from vllm_expertflow.core.files import write_text_atomically

    config = json.loads((out / "config.json").read_text())
    config[QUANTIZED_FROM_KEY] = {
        "model": model.name,
        "config_hash": routing_config_hash(str(model)),
    }
    write_text_atomically(out / "config.json", json.dumps(config, indent=2) + "\n")


def _oneshot_argv(args: argparse.Namespace) -> list[str]:
    return [
        *("--model", str(args.model), "--method", args.method, "--bits", str(args.bits)),
        *("--group-size", str(args.group_size), "--samples", str(args.samples)),
        *("--seq-len", str(args.seq_len), "--out", str(args.out)),
        *("--calibration", *map(str, args.calibration)),
    ]


def write_dequantized(quantized: Path, out: Path) -> None:
    """The quantized checkpoint with its experts expanded back to bf16, value for value.

    What the stock backend runs where it has no int4 MoE kernel (CPUs without AMX): the
    reference expertflow's int4 serving must match token for token.
    """
    import shutil

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file, save_file

    from vllm_expertflow.core.files import atomic_path

    config = json.loads((quantized / "config.json").read_text())
    (group,) = config.pop("quantization_config")["config_groups"].values()
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**group["weights"]))
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(quantized.glob("*.safetensors")):
        tensors.update(load_file(path))
    dense = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight_packed"):
            prefix = name.removesuffix("_packed")
            scale = tensors[f"{prefix}_scale"]
            shape = tuple(tensors[f"{prefix}_shape"].tolist())
            zero_point = tensors.get(f"{prefix}_zero_point")
            dense[prefix] = dequantize_packed(scheme, shape, tensor, scale, zero_point).to(
                scale.dtype
            )
        elif not any(name.endswith(s) for s in ("_scale", "_shape", "_zero_point")):
            dense[name] = tensor
    with atomic_path(out) as tmp_name:
        tmp = Path(tmp_name)
        tmp.mkdir(parents=True)
        for path in quantized.iterdir():
            if path.suffix != ".safetensors" and path.name != "config.json" and path.is_file():
                shutil.copy(path, tmp / path.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        save_file(dense, str(tmp / "model.safetensors"), metadata={"format": "pt"})


def dequantize_packed(
    scheme: QuantizationScheme,
    shape: tuple[int, int],
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
) -> torch.Tensor:
    """A pack-quantized `[N, K]` weight in float, by compressed-tensors' own decompressor: the
    reference that serving's own unpacking (`core/int4.py`) is tested against, bit for bit."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    state = {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor(shape)}
    if zero_point is not None:
        state["weight_zero_point"] = zero_point
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]
