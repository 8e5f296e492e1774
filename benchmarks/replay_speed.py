"""Replay speed: wall microseconds per (token, layer) lookup, per policy, at 25% resident.

    .venv/bin/python benchmarks/replay_speed.py --trace /tmp/ef-traces/eval --tokens 10000
    .venv/bin/python benchmarks/replay_speed.py --synthetic 300

`--trace`: a recorded trace folder (the demo model's, with its committed transition predictor);
`--synthetic N`: N tokens of skewed random top-8 routing over 48 layers x 128 experts (a
Qwen3-30B-A3B-sized pool, 1,536 slots), the transition predictor fitted on it. To time another
commit's replay on the same input, put its checkout first: `PYTHONPATH=/path/to/checkout`.
Prints one JSON line per policy, with the counts, so two commits can be checked for equality.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vllm_expertflow.core.predictor import TransitionPredictor, load_predictor
from vllm_expertflow.core.replay import most_routed_experts, replay, slots_for_fraction
from vllm_expertflow.core.tracer import read_trace

DEMO_TRANSITION = "examples/predictors/expertflow-demo-moe/transition.safetensors"


def synthetic_trace(num_tokens: int, layers: int = 48, experts: int = 128, top_k: int = 8):
    gen = torch.Generator().manual_seed(0)
    manifest = {
        "layers": list(range(layers)),
        "num_experts": experts,
        "top_k": top_k,
        "config_hash": None,
        "num_tokens": num_tokens,
    }
    tensors = {"request_ids": torch.zeros(num_tokens, dtype=torch.int32)}
    popularity = torch.rand(experts, generator=gen) ** 3 + 0.02
    for layer in range(layers):
        routed = torch.multinomial(popularity.expand(num_tokens, experts), top_k, generator=gen)
        tensors[f"topk_ids.{layer}"] = routed
        tensors[f"hidden.{layer}"] = torch.zeros(num_tokens, 1)  # the transition reads none
    return manifest, tensors, TransitionPredictor.fit(manifest, tensors, max_depth=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace")
    source.add_argument("--synthetic", type=int, metavar="TOKENS")
    parser.add_argument("--tokens", type=int, default=10000, help="of --trace, from its start")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.trace:
        manifest, tensors = read_trace(args.trace)
        tensors = {name: t[: args.tokens] for name, t in tensors.items()}
        manifest = {**manifest, "num_tokens": len(tensors["request_ids"])}
        transition = load_predictor(DEMO_TRANSITION, manifest["config_hash"])
    else:
        manifest, tensors, transition = synthetic_trace(args.synthetic)
    slots = slots_for_fraction(0.25, len(manifest["layers"]), manifest["num_experts"])
    policies = {
        "lru": {"mode": "ondemand", "policy": "lru"},
        "lfu": {"mode": "ondemand", "policy": "lfu"},
        "static": {
            "mode": "static",
            "policy": "lru",
            "static_keys": most_routed_experts(manifest, tensors, slots),
        },
        "predictive": {"mode": "ondemand", "policy": "predictive"},
        "belady": {"mode": "belady"},
        "transition": {
            "mode": "prefetch",
            "policy": "predictive",
            "predictor": transition,
            "prefetch_depth": 2,
        },
    }
    for name, spec in policies.items():
        start = time.perf_counter()
        result = replay(manifest, tensors, slots, **spec)
        seconds = time.perf_counter() - start
        row = {
            "policy": name,
            "slots": slots,
            "us_per_lookup": round(seconds / result.lookups * 1e6, 2),
            "seconds": round(seconds, 2),
            "lookups": result.lookups,
            "hits": result.hits,
            "loads": result.loads,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
