"""`vllm-expertflow eval-predictors`: how well each expert predictor would serve the pool.

Two views on a held-out trace:
  * prediction quality: recall@k and the precision of a k- and a 2k-expert prefetch, per depth;
  * cache replays at one pool size: on-demand LRU/LFU, a static hot set, predictive prefetch
    with every predictor at depths 1 and 2, and Belady's offline optimum as the floor.
Writes results.json and results.md to --out and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from vllm_expertflow.core.predictor import (
    ExpertPredictor,
    GatePredictor,
    TransitionPredictor,
    load_predictor,
    predictor_recall,
)
from vllm_expertflow.core.replay import (
    ReplayResult,
    most_routed_experts,
    replay,
    slots_for_fraction,
)
from vllm_expertflow.core.tracer import read_trace

logger = logging.getLogger(__name__)

DEPTHS = (1, 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder (gate weights)")
    parser.add_argument("--train-traces", type=Path, required=True)
    parser.add_argument("--eval-traces", type=Path, required=True)
    parser.add_argument("--learned", type=Path, help="a train-predictor file (kind learned)")
    parser.add_argument("--cache-fraction", type=float, default=0.25)
    parser.add_argument("--out", type=Path, required=True)


def build_predictors(
    args: argparse.Namespace, train: tuple[dict, dict], config_hash: str
) -> dict[str, ExpertPredictor]:
    from vllm_expertflow.core.checkpoint import load_gate_weights

    gates = load_gate_weights(str(args.model))
    predictors: dict[str, ExpertPredictor] = {
        "gate": GatePredictor(gates, max(DEPTHS)),
        "transition": TransitionPredictor.fit(*train, max(DEPTHS)),
    }
    if args.learned:
        predictors["learned"] = load_predictor(str(args.learned), config_hash)
    return predictors


def prediction_quality(
    predictors: dict[str, ExpertPredictor], tensors: dict[str, torch.Tensor], top_k: int
) -> list[dict]:
    rows = []
    for name, predictor in predictors.items():
        for depth in DEPTHS:
            if depth > predictor.max_depth:
                continue
            recall, precision = predictor_recall(predictor, tensors, depth, top_k)
            recall_2k, precision_2k = predictor_recall(predictor, tensors, depth, 2 * top_k)
            rows.append(
                {
                    "predictor": name,
                    "depth": depth,
                    "recall@k": recall,
                    "precision@k": precision,
                    "recall@2k": recall_2k,
                    "precision@2k": precision_2k,
                }
            )
    return rows


def replay_specs(
    predictors: dict[str, ExpertPredictor], static_keys: list
) -> list[tuple[str, dict]]:
    specs = [
        ("lru", {"mode": "ondemand", "policy": "lru"}),
        ("lfu", {"mode": "ondemand", "policy": "lfu"}),
        ("static", {"mode": "static", "policy": "lru", "static_keys": static_keys}),
    ]
    for name, predictor in predictors.items():
        for depth in DEPTHS:
            if depth <= predictor.max_depth:
                options = {"predictor": predictor, "prefetch_depth": depth}
                specs.append(
                    (f"{name}-d{depth}", {"mode": "prefetch", "policy": "predictive", **options})
                )
    specs.append(("belady", {"mode": "belady"}))
    return specs


def replay_rows(results: list[ReplayResult], belady: ReplayResult) -> list[dict]:
    base = max(belady.demand_misses, 1)
    return [
        {
            "run": r.name,
            "lookups": r.lookups,
            "hits": r.hits,
            "hit_rate": r.hit_rate,
            "stalls": r.demand_misses,
            "stalls_vs_belady": r.demand_misses / base,
            "loads": r.loads,
            "prefetch_issued": r.prefetch_issued,
            "prefetch_used": r.prefetch_used,
            "prefetch_wasted": r.prefetch_wasted,
        }
        for r in results
    ]


def markdown_table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from vllm_expertflow.tools.trace import model_metadata

    train = read_trace(str(args.train_traces))
    manifest, tensors = read_trace(str(args.eval_traces))
    config_hash = model_metadata(args.model)["config_hash"]
    for trace, (m, _) in ((args.train_traces, train), (args.eval_traces, (manifest, tensors))):
        if m["config_hash"] != config_hash:
            logger.error("expertflow: trace %s was not recorded with %s", trace, args.model)
            return 2
    predictors = build_predictors(args, train, config_hash)
    quality = prediction_quality(predictors, tensors, manifest["top_k"])

    layers, num_experts = manifest["layers"], manifest["num_experts"]
    num_slots = slots_for_fraction(args.cache_fraction, len(layers), num_experts)
    static_keys = most_routed_experts(*train, num_slots)
    results = [
        replay(manifest, tensors, num_slots, name=name, progress=True, **options)
        for name, options in replay_specs(predictors, static_keys)
    ]
    replays = replay_rows(results, results[-1])

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": str(args.model),
        "config_hash": config_hash,
        "eval_tokens": len(tensors["request_ids"]),
        "cache_fraction": args.cache_fraction,
        "num_slots": num_slots,
        "prediction": quality,
        "replay": replays,
        "replay_per_layer": {r.name: r.to_dict()["per_layer"] for r in results},
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    title = (
        f"## Replay at cache fraction {args.cache_fraction} ({num_slots} slots, "
        f"{summary['eval_tokens']} tokens)"
    )
    text = "\n\n".join(
        ["## Prediction quality", markdown_table(quality), title, markdown_table(replays)]
    )
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    return 0
