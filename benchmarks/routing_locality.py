"""How much a recorded routing trace lets a cache that knows only the past beat chance.

Per MoE layer: the share of routing decisions that go to the layer's most routed experts (a
pool holding a fraction of them, if it knew the frequencies in advance and nothing else), and
how often a token's expert was routed by the previous token, or by one of the last four, of
the same request; each against what uniform, memoryless routing would give. Belady's floor
knows the future; these say how much of its hit rate the past can explain.

    .venv/bin/python benchmarks/routing_locality.py --trace /tmp/ef-traces/eval
"""

from __future__ import annotations

import argparse

import numpy as np

from vllm_expertflow.core.predictor import trace_layers
from vllm_expertflow.core.tracer import read_trace

FRACTIONS = (0.125, 0.25, 0.5)
WINDOW = 4  # tokens back


def reuse(topk: np.ndarray, requests: np.ndarray, window: int) -> float:
    """Share of a token's experts that one of the `window` tokens before it, of the same
    request, was routed to (tokens with that many predecessors only)."""
    shares = []
    for row in range(window, len(topk)):
        if (requests[row - window : row] != requests[row]).any():
            continue
        seen = set(topk[row - window : row].flatten().tolist())
        shares.append(np.isin(topk[row], list(seen)).mean())
    return float(np.mean(shares))


def uniform_reuse(num_experts: int, top_k: int, window: int) -> float:
    """`reuse` for k distinct experts drawn uniformly at every token."""
    return 1.0 - (1.0 - top_k / num_experts) ** window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", required=True, help="a trace directory (vllm-expertflow trace)")
    args = parser.parse_args()
    manifest, tensors = read_trace(args.trace)
    num_experts, top_k = manifest["num_experts"], manifest["top_k"]
    requests = tensors["request_ids"].numpy()
    held = [max(1, round(f * num_experts)) for f in FRACTIONS]
    header = [f"top {c} share" for c in held] + ["previous token", f"last {WINDOW} tokens"]
    print(f"{manifest['num_tokens']} tokens, {num_experts} experts, top-{top_k}")
    print("| layer | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for layer in trace_layers(manifest):
        topk = tensors[f"topk_ids.{layer}"].long().numpy()
        counts = np.sort(np.bincount(topk.flatten(), minlength=num_experts))[::-1]
        shares = [counts[:c].sum() / counts.sum() for c in held]
        cells = [*shares, reuse(topk, requests, 1), reuse(topk, requests, WINDOW)]
        print(f"| {layer} | " + " | ".join(f"{x:.2f}" for x in cells) + " |")
    chance = [c / num_experts for c in held]
    chance += [uniform_reuse(num_experts, top_k, 1), uniform_reuse(num_experts, top_k, WINDOW)]
    print("| uniform | " + " | ".join(f"{x:.2f}" for x in chance) + " |")


if __name__ == "__main__":
    main()
