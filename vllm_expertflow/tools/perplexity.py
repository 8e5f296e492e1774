"""`vllm-expertflow perplexity`: perplexity of text through the real vLLM engine.

The text is cut into independent windows of `--chunk-tokens`; each window is one request and
every token after its first is scored from vLLM's prompt logprobs, so the number measures the
engine as served (backend, kernels, quantized weights), not a reimplementation of the model.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from vllm_expertflow.tools.engine_runs import DEMO_MODEL, open_engine
from vllm_expertflow.tools.trace import text_chunks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--text", type=Path, nargs="+", required=True)
    parser.add_argument("--moe-backend", default="auto", help="auto (stock) or expertflow")
    parser.add_argument(
        "--options",
        type=json.loads,
        default=None,
        help='expertflow options as JSON, e.g. {"cache_fraction": 0.5}',
    )
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument(
        "--max-tokens", type=int, default=40_000, help="tokens scored per file, at most"
    )


def perplexity(llm, chunks: list[list[int]]) -> tuple[float, int]:
    """exp(mean negative log-likelihood) over every token after each chunk's first."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=chunk) for chunk in chunks]
    outputs = llm.generate(prompts, params)
    nll, count = 0.0, 0
    for chunk, output in zip(chunks, outputs, strict=True):
        for token, logprobs in zip(chunk[1:], output.prompt_logprobs[1:], strict=True):
            nll -= logprobs[token].logprob
            count += 1
    return math.exp(nll / count), count


def limit_tokens(chunks: list[list[int]], max_tokens: int) -> list[list[int]]:
    kept, total = [], 0
    for chunk in chunks:
        if total + len(chunk) > max_tokens:
            break
        kept.append(chunk)
        total += len(chunk)
    return kept


def run(args: argparse.Namespace) -> int:
    """Prints one JSON line: perplexity and tokens scored per text file."""
    result = {"model": str(args.model), "moe_backend": args.moe_backend, "options": args.options}
    with open_engine(args.moe_backend, args.options, args.model) as llm:
        for path in args.text:
            chunks = text_chunks(args.model, [path], args.chunk_tokens)
            value, tokens = perplexity(llm, limit_tokens(chunks, args.max_tokens))
            result[path.name] = {"perplexity": round(value, 3), "tokens_scored": tokens}
    print(json.dumps(result))
    return 0
