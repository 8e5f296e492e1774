"""Golden replay counts: every count `core/replay.py` makes on recorded routing, kept so that a
faster replay is held to the same answers.

    .venv/bin/python tests/core/make_replay_golden.py

replays golden/demo_routing.npz (the first 3,000 tokens of the demo model's held-out trace:
`vllm-expertflow trace --export-npz`) under every policy, at three pool sizes, one token and
eight tokens per forward, and writes golden/replay_counts.json atomically. The file was first
written by the replay as it stood at commit 45b54ee (before it was made ten times faster);
test_replay_golden.py checks today's replay against it. Regenerate it only for a change that
means to change what the replay counts, and say so in the commit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from vllm_expertflow.core.files import write_text_atomically
from vllm_expertflow.core.predictor import TransitionPredictor
from vllm_expertflow.core.replay import most_routed_experts, replay, slots_for_fraction
from vllm_expertflow.core.tracer import read_routing_npz

GOLDEN_DIR = Path(__file__).parent / "golden"
ROUTING = GOLDEN_DIR / "demo_routing.npz"
COUNTS = GOLDEN_DIR / "replay_counts.json"
REPLAYED_TOKENS = 1000  # replayed; the rest of the file fits the predictor and the hot set
WARM_STEPS = 20


def _rows(tensors: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {name: t[rows] for name, t in tensors.items()}


def replay_cases() -> Iterator[tuple[str, dict]]:
    """(case name, `replay` keyword arguments) for every golden case."""
    manifest, tensors = read_routing_npz(str(ROUTING))
    layers, num_experts = manifest["layers"], manifest["num_experts"]
    # The transition predictor reads routing only; the replay's predictions take hidden states.
    for layer in layers:
        tensors[f"hidden.{layer}"] = torch.zeros(len(tensors["request_ids"]), 1)
    fit = _rows(tensors, slice(REPLAYED_TOKENS, None))
    fit_manifest = {**manifest, "num_tokens": len(fit["request_ids"])}
    transition = TransitionPredictor.fit(fit_manifest, fit, max_depth=2)
    replayed = _rows(tensors, slice(0, REPLAYED_TOKENS))
    batched = [list(range(i, i + 8)) for i in range(0, REPLAYED_TOKENS, 8)]
    for fraction in (0.125, 0.25, 0.5):
        num_slots = slots_for_fraction(fraction, len(layers), num_experts)
        hot = most_routed_experts(fit_manifest, fit, num_slots)
        policies = {
            "lru": {"mode": "ondemand", "policy": "lru"},
            "lfu": {"mode": "ondemand", "policy": "lfu"},
            "predictive-ondemand": {"mode": "ondemand", "policy": "predictive"},
            "static": {"mode": "static", "policy": "lru", "static_keys": hot},
            "belady": {"mode": "belady"},
            "transition-predictive": {
                "mode": "prefetch",
                "policy": "predictive",
                "predictor": transition,
                "prefetch_depth": 2,
            },
            "transition-lru": {
                "mode": "prefetch",
                "policy": "lru",
                "predictor": transition,
                "prefetch_depth": 1,
            },
        }
        for policy, spec in policies.items():
            for batch, steps in ((1, None), (8, batched)):
                kwargs = {
                    "manifest": manifest,
                    "tensors": replayed,
                    "num_slots": num_slots,
                    "steps": steps,
                    "warm_steps": WARM_STEPS,
                    "timeline": True,
                    **spec,
                }
                yield f"{policy}/{fraction}/batch{batch}", kwargs


def counts_of(kwargs: dict) -> dict:
    """Everything a replay counts: totals, per layer, and a digest of its timeline log."""
    result = replay(**kwargs)
    log = [
        [[s.layer, s.tokens, s.experts_run, s.demand_loads, s.prefetch_targets] for s in forward]
        for forward in result.forwards
    ]
    counts = result.to_dict()
    counts["timeline_sha256"] = hashlib.sha256(json.dumps(log).encode()).hexdigest()
    return counts


def main() -> None:
    from tqdm import tqdm

    cases = list(replay_cases())
    golden = {name: counts_of(kwargs) for name, kwargs in tqdm(cases, desc="replays")}
    write_text_atomically(COUNTS, json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(golden)} cases to {COUNTS}")


if __name__ == "__main__":
    main()
