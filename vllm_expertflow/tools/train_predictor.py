"""`vllm-expertflow train-predictor`: fit a next-layer expert predictor on a routing trace.

`learned` heads start from the gate weights of the model the trace names (or `--model`) and
are trained to each later layer's routed set; `transition` counts expert-id co-occurrences.
Held-out recall@k per depth is reported on `--eval-traces`, or else on 10% of the training
trace's requests (split by request: tokens of one text are too alike to be split apart).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from vllm_expertflow.core.files import write_text_atomically
from vllm_expertflow.core.predictor import (
    CONTEXT_INPUTS,
    ExpertPredictor,
    LearnedPredictor,
    TransitionPredictor,
    predictor_recall,
    save_predictor,
)
from vllm_expertflow.core.replay import most_routed_experts
from vllm_expertflow.core.tracer import read_trace

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traces", type=Path, required=True, help="training trace directory")
    parser.add_argument("--out", type=Path, required=True, help="predictor file to write")
    parser.add_argument("--kind", choices=("learned", "transition"), default="learned")
    parser.add_argument("--eval-traces", type=Path, help="held-out trace (default: 10%% split)")
    parser.add_argument("--model", type=Path, help="gate weights (default: the trace's model)")
    parser.add_argument("--max-depth", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden-units", type=int, default=256, help="0: linear heads")
    parser.add_argument(
        "--routed-features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="feed layer L's routed-expert multi-hot to the heads",
    )
    parser.add_argument(
        "--context",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="feed layer L's MoE output and the previous token's router input and MoE output "
        "to the heads (needs hidden units; the prefetch then starts once layer L has computed)",
    )
    parser.add_argument("--loss", choices=("softmax", "bce"), default="bce")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--holdout", type=float, default=0.1, help="share of requests held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hot-experts-out",
        type=Path,
        help="also write the trace's (layer, expert) pairs, most routed first, as JSON "
        "(the static policy's hot set)",
    )


def split_by_request(
    tensors: dict[str, torch.Tensor], fraction: float, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(train, held-out) rows, holding out a seeded `fraction` of whole requests."""
    requests = tensors["request_ids"].unique()
    generator = torch.Generator().manual_seed(seed)
    count = max(1, round(fraction * len(requests))) if len(requests) > 1 else 0
    held = requests[torch.randperm(len(requests), generator=generator)[:count]]
    is_held = torch.isin(tensors["request_ids"], held)
    return select_rows(tensors, ~is_held), select_rows(tensors, is_held)


def select_rows(tensors: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: value[rows] for key, value in tensors.items()}


def build_predictor(
    args: argparse.Namespace, manifest: dict, tensors: dict[str, torch.Tensor]
) -> ExpertPredictor:
    if args.kind == "transition":
        return TransitionPredictor.fit(manifest, tensors, args.max_depth)
    from vllm_expertflow.core.checkpoint import load_gate_weights

    gates = load_gate_weights(str(args.model or manifest["model"]))
    gates = {layer: gates[layer] for layer in manifest["layers"]}
    predictor = LearnedPredictor(
        gates,
        args.max_depth,
        args.hidden_units,
        args.routed_features,
        origin={"model": str(manifest["model"]), "config_hash": manifest["config_hash"]},
        context_inputs=CONTEXT_INPUTS if args.context and args.hidden_units else (),
    )
    predictor.fit(
        tensors, args.epochs, args.lr, args.batch_size, args.loss, args.seed, progress=True
    )
    return predictor


def recall_by_depth(
    predictor: ExpertPredictor, tensors: dict[str, torch.Tensor], top_k: int
) -> dict[int, float]:
    return {
        depth: predictor_recall(predictor, tensors, depth, top_k)[0]
        for depth in range(1, predictor.max_depth + 1)
    }


def run(args: argparse.Namespace) -> int:
    manifest, tensors = read_trace(str(args.traces))
    # Depth d predicts layer L + d from layer L: N MoE layers have pairs up to depth N - 1.
    deepest = len(manifest["layers"]) - 1
    if deepest < 1:
        logger.error(
            "expertflow: the traced model has one MoE layer, so there is no later layer to "
            "predict; use predictor: none"
        )
        return 2
    if args.max_depth > deepest:
        logger.warning(
            "expertflow: --max-depth %d is deeper than this model's %d MoE layers allow; "
            "training depths 1..%d",
            args.max_depth,
            deepest + 1,
            deepest,
        )
        args.max_depth = deepest
    if args.eval_traces:
        eval_manifest, held = read_trace(str(args.eval_traces))
        if eval_manifest["config_hash"] != manifest["config_hash"]:
            logger.error("expertflow: --eval-traces come from another model config than --traces")
            return 2
        train = tensors
    else:
        train, held = split_by_request(tensors, args.holdout, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.hot_experts_out:
        args.hot_experts_out.parent.mkdir(parents=True, exist_ok=True)
        hot = most_routed_experts(manifest, train, count=len(manifest["layers"]) * 10**6)
        write_text_atomically(args.hot_experts_out, json.dumps([list(key) for key in hot]))
    logger.info("training %s predictor on %d tokens", args.kind, len(train["request_ids"]))
    predictor = build_predictor(args, manifest, train)
    save_predictor(predictor, str(args.out))
    logger.info("wrote %s", args.out)
    for depth, recall in recall_by_depth(predictor, held, manifest["top_k"]).items():
        logger.info(
            "held-out recall@%d at depth %d: %.4f (%d tokens)",
            manifest["top_k"],
            depth,
            recall,
            len(held["request_ids"]),
        )
    return 0
