"""`vllm-expertflow trace`: record the router's inputs and choices while the real vLLM engine
reads text. The format is documented in `vllm_expertflow/core/tracer.py`.

Each text chunk is one request, prefilled alone in one engine step (max_num_seqs=1 and a token
budget that holds the chunk), so a step's tokens are exactly one request's positions 0..n-1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from vllm_expertflow.core.checkpoint import routing_config_hash
from vllm_expertflow.core.model_shape import MoEShape
from vllm_expertflow.core.tracer import read_trace, write_routing_npz
from vllm_expertflow.tools.engine_runs import DEMO_MODEL, greedy_params, open_engine

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--text", type=Path, nargs="+", help="text files to trace")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--export-npz",
        type=Path,
        metavar="TRACE_DIR",
        help="instead of tracing: write TRACE_DIR's routing to --out as a plain .npz routing "
        "file (what `plan` reads from other engines)",
    )
    parser.add_argument("--chunk-tokens", type=int, default=256, help="tokens per request")
    parser.add_argument("--max-tokens", type=int, default=200_000, help="tokens recorded, at most")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="share of tokens kept")
    parser.add_argument("--seed", type=int, default=0)


def model_metadata(model: Path) -> dict:
    """What a trace records about its model; the worker adds the MoE layers' real ids."""
    config = json.loads((model / "config.json").read_text())
    shape = MoEShape.of(config)
    if shape is None:
        raise SystemExit(f"trace: {model}/config.json names no routed experts")
    text = config.get("text_config") or config
    return {
        "model": str(model.resolve()),
        "config_hash": routing_config_hash(str(model)),
        "num_experts": shape.num_experts,
        "top_k": shape.top_k,
        "hidden_size": text["hidden_size"],
    }


def text_chunks(model: Path, files: list[Path], chunk_tokens: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    chunks = []
    for path in files:
        ids = tokenizer(path.read_text())["input_ids"]
        chunks += [ids[i : i + chunk_tokens] for i in range(0, len(ids) - 1, chunk_tokens)]
    return [c for c in chunks if len(c) > 1]


def run(args: argparse.Namespace) -> int:
    if args.export_npz is not None:
        manifest, tensors = read_trace(str(args.export_npz))
        write_routing_npz(manifest, tensors, str(args.out))
        logger.info("trace: %d tokens of routing written to %s", manifest["num_tokens"], args.out)
        return 0
    if not args.text:
        raise SystemExit("trace: give --text files to trace (or --export-npz TRACE_DIR)")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"trace: {args.out} is not empty; choose a new --out directory")
    chunks = text_chunks(args.model, args.text, args.chunk_tokens)
    # Requests past the token budget would only cost time: the tracer records nothing more.
    chunks = chunks[: math.ceil(args.max_tokens / (args.sample_rate * args.chunk_tokens)) + 1]
    options = {"cache_fraction": 1.0, "store": "ram"}
    with open_engine(
        "expertflow",
        options,
        args.model,
        enforce_eager=False,
        max_num_batched_tokens=max(args.chunk_tokens, 512),
        max_num_seqs=1,
        enable_prefix_caching=False,
    ) as llm:
        llm.collective_rpc(
            "expertflow_start_tracing",
            args=(
                str(args.out),
                model_metadata(args.model),
                args.max_tokens,
                args.sample_rate,
                args.seed,
            ),
        )
        prompts = [{"prompt_token_ids": chunk} for chunk in chunks]
        llm.generate(prompts, greedy_params(1), use_tqdm=True)
        manifest = llm.collective_rpc("expertflow_stop_tracing")[0]
    if manifest["num_steps"] != len(chunks):
        raise RuntimeError(
            f"trace: {manifest['num_steps']} engine steps for {len(chunks)} requests; "
            "requests were batched together, so positions would be wrong"
        )
    logger.info(
        "trace: %d tokens from %d requests written to %s",
        manifest["num_tokens"],
        len(chunks),
        args.out,
    )
    return 0
