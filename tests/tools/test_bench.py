"""`vllm-expertflow bench --quick` on tiny settings: the results hold together."""

import argparse
import json

import pytest

from vllm_expertflow.cli import main
from vllm_expertflow.tools.engine_runs import DEMO_MODEL

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """`--quick` without `--policies`: the quick policy list must be the one that runs."""
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "bench",
        "--quick",
        "--budgets",
        "0.25",
        "--batches",
        "1",
        "--decode-tokens",
        "4",
        "--store",
        "disk",
        "--store-dir",
        str(out / "store"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert (out / "bench.png").stat().st_size > 10_000
    assert "| learned |" in (out / "results.md").read_text()
    return json.loads((out / "results.json").read_text())


def test_schema_names_every_unit(results):
    for key in ("command", "model", "store", "link", "machine", "units", "online", "offline"):
        assert key in results
    assert str(DEMO_MODEL) == results["model"]
    for row in results["online"]:
        assert {"policy", "cache_fraction", "batch", "decode_tokens_per_s"} <= set(row)


def test_quick_runs_its_own_policy_list(results):
    from vllm_expertflow.tools.bench import QUICK

    assert QUICK["policies"] == "stock,lru-ondemand,learned,belady"
    assert {row["policy"] for row in results["online"]} == {"stock", "lru-ondemand", "learned"}
    assert {row["policy"] for row in results["offline"]} == {"lru-ondemand", "learned", "belady"}


def test_explicit_options_win_over_quick_and_full_defaults():
    from vllm_expertflow.tools.bench import FULL, QUICK, add_arguments, resolve_defaults

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cases = [
        (["--quick"], QUICK["policies"], QUICK["budgets"]),
        ([], FULL["policies"], FULL["budgets"]),
        (["--quick", "--policies", "stock,gate"], "stock,gate", QUICK["budgets"]),
        (["--policies", "static", "--budgets", "0.5"], "static", "0.5"),
    ]
    for argv, policies, budgets in cases:
        args = parser.parse_args([*argv, "--out", "unused"])
        resolve_defaults(args)
        assert (args.policies, args.budgets) == (policies, budgets), argv


def test_online_counts_add_up_and_stock_is_the_unit(results):
    online = {row["policy"]: row for row in results["online"]}
    assert set(online) == {"stock", "lru-ondemand", "learned"}
    assert online["stock"]["decode_ratio_vs_stock"] == 1.0
    for policy in ("lru-ondemand", "learned"):
        row = online[policy]
        assert row["hits"] + row["misses"] == row["lookups"] > 0
        assert 0.0 <= row["hit_rate"] <= 1.0
    assert online["learned"]["prefetches_issued"] > 0


def test_belady_is_the_floor(results):
    offline = {row["policy"]: row for row in results["offline"]}
    assert offline["belady"]["loads_vs_belady"] == 1.0
    for policy, row in offline.items():
        assert row["loads"] >= offline["belady"]["loads"], policy
        assert row["lookups"] == offline["belady"]["lookups"]
    assert 0.0 < offline["learned"]["next_layer_recall"] <= 1.0


def test_equal_memory_budgets_are_bf16_expert_bytes():
    from vllm_expertflow.tools.bench import bf16_expert_bytes

    config = json.loads((DEMO_MODEL / "config.json").read_text())
    # 6 MoE layers x 32 experts x (gate, up, down of 256 x 128) x 2 bytes
    assert bf16_expert_bytes(config) == 6 * 32 * 3 * 256 * 128 * 2
