"""Greedy tokens of `moe_backend="expertflow"` equal the stock backend's, at every cache size."""

import os

import pytest
from conftest import MAX_NUM_BATCHED_TOKENS

from vllm_expertflow.tools.engine_runs import run_greedy

CACHES = ["1.0", "0.5", "0.25", "min"]
pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def disk_store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("expert-store")


def cache_options(cache: str, top_k: int) -> dict:
    return {"cache_experts": top_k} if cache == "min" else {"cache_fraction": float(cache)}


def layer_files(directory) -> dict[str, int]:
    return {
        f"{root}/{name}": os.stat(os.path.join(root, name)).st_mtime_ns
        for root, _, names in os.walk(directory)
        for name in names
        if name.endswith(".bin")
    }


@pytest.mark.parametrize("store", ["ram", "disk"])
@pytest.mark.parametrize("cache", CACHES)
def test_greedy_tokens_match_stock(store, cache, prompts, stock_run, demo_config, disk_store_dir):
    top_k, num_experts = demo_config["num_experts_per_tok"], demo_config["num_experts"]
    options = {**cache_options(cache, top_k), "store": store, "store_dir": str(disk_store_dir)}
    files_before = layer_files(disk_store_dir)

    run = run_greedy(prompts, "expertflow", options, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS)

    assert run.token_ids == stock_run.token_ids
    assert all(len(tokens) == 32 for tokens in run.token_ids)
    total = run.stats["total"]
    assert total["hits"] + total["misses"] == total["lookups"] > 0
    assert set(run.stats["layers"]) == {str(i) for i in range(demo_config["num_hidden_layers"])}
    expert_bytes = 3 * demo_config["hidden_size"] * demo_config["moe_intermediate_size"] * 2
    assert total["bytes_loaded"] == total["misses"] * expert_bytes
    if cache == "1.0":
        # Everything fits: each expert is loaded at most once, ever.
        assert total["misses"] <= num_experts * demo_config["num_hidden_layers"]
    if cache == "min":
        assert total["misses"] > total["hits"] / 10, "a 4-slot pool must keep missing"
    if store == "disk" and files_before:
        # Written once at first load, then reused untouched.
        assert layer_files(disk_store_dir) == files_before
