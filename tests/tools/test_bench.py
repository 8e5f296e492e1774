"""`vllm-expertflow bench --quick` on tiny settings: the results hold together."""

import argparse
import json

import pytest

from vllm_expertflow.cli import main
from vllm_expertflow.tools.engine_runs import DEMO_MODEL

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
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
    return out


@pytest.fixture(scope="module")
def results(bench_out):
    return json.loads((bench_out / "results.json").read_text())


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


def test_the_decode_profile_splits_the_moe_step_into_its_measured_parts(results):
    from vllm_expertflow.tools.bench import render_markdown

    for row in results["online"]:
        assert row["decode_step_ms"] > 0
        if row["policy"] == "stock":
            assert "moe_ms" not in row
            continue
        parts = [row[k] for k in ("kernel_ms", "stall_ms", "predict_ms", "expand_ms")]
        assert row["kernel_ms"] > 0 and all(part >= 0 for part in parts)
        assert row["bookkeeping_ms"] == pytest.approx(row["moe_ms"] - sum(parts))
        assert row["bookkeeping_ms"] > 0
        assert (row["predict_ms"] > 0) == (row["policy"] == "learned")
    assert "Where a decode step's time goes" in render_markdown(results)


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


def test_every_expertflow_row_has_its_physical_limit(results):
    stock = next(r for r in results["online"] if r["policy"] == "stock")
    for row in results["online"]:
        if row["policy"] == "stock":
            continue
        assert row["compute_s_per_token"] == pytest.approx(1 / stock["decode_tokens_per_s"])
        assert row["expert_load_s"] > 0 and row["belady_loads_per_token"] > 0  # 25% resident
        assert row["link_s_per_token"] == pytest.approx(
            row["belady_loads_per_token"] * row["expert_load_s"]
        )
        # No configuration decodes faster than stock with every expert resident.
        assert row["limit_tokens_per_s"] <= stock["decode_tokens_per_s"]
        assert row["limit_ratio"] == pytest.approx(
            row["decode_tokens_per_s"] / row["limit_tokens_per_s"]
        )
        # The limit's load time is the store's with as many loads in flight as the pool has.
        assert row["expert_load_s"] == results["load_seconds_in_flight"][-1]
    assert len(results["load_seconds_in_flight"]) == 3  # an I/O thread, two demand readers
    assert "limit_ratio" in results["units"]


def test_every_replayable_row_has_its_planned_speed(results):
    # The plan's timeline on this run's own measurements: compute is stock's plus the plugin's
    # own work, so no plan is faster than stock; at 25% resident some layer waits for a load.
    stock = next(r for r in results["online"] if r["policy"] == "stock")
    planned = [r for r in results["online"] if "planned_tokens_per_s" in r]
    assert {r["policy"] for r in planned} == {"lru-ondemand", "learned"}  # --quick's
    for row in planned:
        assert 0 < row["planned_tokens_per_s"] <= stock["decode_tokens_per_s"] * (1 + 1e-9)
        assert 0 <= row["planned_stall_share"] < 1
        assert row["planned_overhead_s_per_layer"] > 0  # the step's bookkeeping, at least
        if row["policy"] == "lru-ondemand" and row["cache_fraction"] < 1:
            assert row["planned_stall_share"] > 0  # demand misses wait for their loads
            assert row["planned_stall_ms"] > 0 and row["stall_ms"] > 0
            # Loads share the store: a load's charge is at most its wall time.
            assert 0 < row["decode_link_s_per_load"]
            assert 0 < row["link_seconds"] <= row["load_seconds"]
    assert "planned_tokens_per_s" in results["units"]


def test_physical_limit_is_the_slower_of_compute_and_link():
    from vllm_expertflow.tools.bench import physical_limit

    # 10 ms of compute per token; 3 loads per token of 5 ms each: the link takes 15 ms.
    link_bound = physical_limit(0.010, 3.0, 0.005)
    assert link_bound["link_s_per_token"] == pytest.approx(0.015)
    assert link_bound["limit_tokens_per_s"] == pytest.approx(1 / 0.015)
    assert link_bound["bound"] == "link"
    compute_bound = physical_limit(0.010, 1.0, 0.005)
    assert compute_bound["limit_tokens_per_s"] == pytest.approx(100.0)
    assert compute_bound["bound"] == "compute"
    assert physical_limit(0.010, 0.0, 0.005)["limit_tokens_per_s"] == pytest.approx(100.0)


def test_generation_steps_replay_a_batch_as_the_engine_runs_it():
    import torch

    from vllm_expertflow.tools.bench import generation_steps

    # Request 0: 3 prompt rows, request 1: 2; then 2 decode rows each, rows interleaved and
    # not in position order (as a trace may hold them).
    request_ids = torch.tensor([1, 0, 0, 1, 0, 1, 0, 1, 0, 2], dtype=torch.int32)
    positions = torch.tensor([0, 1, 0, 1, 2, 3, 4, 2, 3, 0], dtype=torch.int32)
    tensors = {"request_ids": request_ids, "positions": positions}
    steps = generation_steps(tensors, batch=2, decode_tokens=2)
    assert steps == [[2, 1, 4, 0, 3], [8, 7], [6, 5]]
    assert generation_steps(tensors, batch=1, decode_tokens=2) == [[2, 1, 4], [8], [6]]


def test_the_trace_gives_each_prompt_one_request_prefill_and_decode(bench_out):
    from vllm_expertflow.core.tracer import read_trace

    _, tensors = read_trace(str(bench_out / "trace"))
    requests, positions = tensors["request_ids"], tensors["positions"]
    # One prompt (the largest batch is 1): its prefill, then 4 decode steps, as one request.
    assert requests.unique().tolist() == [0]
    assert positions.sort().values.tolist() == list(range(len(positions)))
    assert len(positions) > 4
