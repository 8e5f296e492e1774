"""`vllm-expertflow` command line: one subcommand per tool module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module exposes `add_arguments(parser)` and `run(args) -> int`; imported lazily so that
# `vllm-expertflow --help` does not pay for torch or vllm.
SUBCOMMANDS = {
    "build-demo-model": ("vllm_expertflow.tools.build_demo_model", "train the demo Qwen3-MoE"),
    "widen-model": (
        "vllm_expertflow.tools.widen_model",
        "the same model with N times wider experts (real-sized experts, trained routing)",
    ),
    "trace": ("vllm_expertflow.tools.trace", "record routing traces with the real engine"),
    "bench": ("vllm_expertflow.tools.bench", "decode/prefill speed against the stock backend"),
    "train-predictor": (
        "vllm_expertflow.tools.train_predictor",
        "fit a next-layer expert predictor on a routing trace",
    ),
    "eval-predictors": (
        "vllm_expertflow.tools.eval_predictors",
        "compare expert predictors and cache policies on a held-out trace",
    ),
    "plan": (
        "vllm_expertflow.tools.plan",
        "predict decode tok/s for a model, a machine and pool sizes from a routing trace",
    ),
    "quantize": (
        "vllm_expertflow.tools.quantize",
        "int4 GPTQ/AWQ experts with llm-compressor, in a checkpoint vLLM loads",
    ),
    "perplexity": (
        "vllm_expertflow.tools.perplexity",
        "perplexity of held-out text through the real engine, any MoE backend",
    ),
    "serve-ray": (
        "vllm_expertflow.tools.serve_ray",
        "serve N ExpertFlow engine replicas behind one endpoint with Ray Serve",
    ),
    "store": (
        "vllm_expertflow.tools.store",
        "list the disk stores of a store_dir, or remove unused ones (gc)",
    ),
    "load-test": (
        "vllm_expertflow.tools.load_test",
        "bounded concurrent load against an OpenAI-compatible server",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vllm-expertflow")
    commands = parser.add_subparsers(dest="command", required=True)
    chosen = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        if name == chosen:  # only the chosen tool's imports are paid for
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return module.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
