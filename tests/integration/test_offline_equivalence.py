"""Greedy tokens of `moe_backend="expertflow"` equal the stock backend's, for every cache size,
store, eviction policy and predictor. One engine per store; `reconfigure` swaps the pool."""

import math
import os
import shutil

import pytest
from conftest import MAX_NUM_BATCHED_TOKENS

import vllm_expertflow
from vllm_expertflow.core.store_catalog import list_stores
from vllm_expertflow.tools.engine_runs import (
    DEMO_MODEL,
    DEMO_PREDICTORS,
    greedy_params,
    open_engine,
)

pytestmark = pytest.mark.engine

LEARNED = DEMO_PREDICTORS / "learned.safetensors"
TRANSITION = DEMO_PREDICTORS / "transition.safetensors"
HOT_SET = DEMO_PREDICTORS / "hot_experts.json"
# (cache, extra options): cache is a fraction of all experts, or "min" for top-k slots.
CONFIGS = [
    ("1.0", {}),
    ("0.5", {}),
    ("0.25", {}),
    ("min", {}),
    ("0.25", {"policy": "lfu"}),
    ("min", {"policy": "lfu"}),
    ("0.25", {"policy": "predictive", "predictor": "gate", "prefetch_depth": 2}),
    ("min", {"policy": "predictive", "predictor": "gate"}),
    ("0.25", {"policy": "predictive", "predictor": str(LEARNED), "prefetch_depth": 2}),
    ("min", {"policy": "predictive", "predictor": str(LEARNED)}),
    ("0.25", {"policy": "lru", "predictor": str(TRANSITION)}),
    ("0.25", {"policy": "static", "static_experts": str(HOT_SET)}),
    ("min", {"policy": "static", "static_experts": str(HOT_SET)}),
]


def layer_files(directory) -> dict[str, int]:
    return {
        os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
        for root, _, names in os.walk(directory)
        for name in names
        if name.endswith(".bin")
    }


@pytest.fixture(scope="module", params=["ram", "disk"])
def engine(request, disk_store_dir):
    store = request.param
    options = {"cache_fraction": 1.0, "store": store, "store_dir": str(disk_store_dir)}
    with open_engine("expertflow", options, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS) as llm:
        yield store, llm


def options_for(cache: str, extra: dict, store: str, store_dir, top_k: int) -> dict:
    size = {"cache_experts": top_k} if cache == "min" else {"cache_fraction": float(cache)}
    return {**size, **extra, "store": store, "store_dir": str(store_dir)}


@pytest.mark.parametrize("cache, extra", CONFIGS, ids=[f"{c}-{e}" for c, e in CONFIGS])
def test_greedy_tokens_match_stock(
    engine, cache, extra, prompts, stock_run, demo_config, disk_store_dir
):
    store, llm = engine
    top_k, num_experts = demo_config["num_experts_per_tok"], demo_config["num_experts"]
    num_layers = demo_config["num_hidden_layers"]
    vllm_expertflow.reconfigure(llm, options_for(cache, extra, store, disk_store_dir, top_k))

    outputs = llm.generate(prompts, greedy_params(32), use_tqdm=False)
    stats = vllm_expertflow.get_stats(llm)

    assert [list(o.outputs[0].token_ids) for o in outputs] == stock_run.token_ids
    total = stats["total"]
    assert total["hits"] + total["misses"] == total["lookups"] > 0
    assert set(stats["layers"]) == {str(i) for i in range(num_layers)}
    expert_bytes = 3 * demo_config["hidden_size"] * demo_config["moe_intermediate_size"] * 2
    num_slots = top_k if cache == "min" else math.ceil(float(cache) * num_layers * num_experts)
    preloaded = num_slots - top_k if extra.get("policy") == "static" else 0  # the hot set
    loads = total["misses"] + total["prefetches_issued"] + preloaded
    assert total["bytes_loaded"] == loads * expert_bytes
    assert total["prefetches_used"] + total["prefetches_wasted"] <= total["prefetches_issued"]
    if cache == "1.0":
        assert total["misses"] <= num_experts * num_layers, "all fit: each loads at most once"
    if cache == "min":
        assert total["misses"] > total["hits"] / 10, "a top-k-slot pool must keep missing"
    if "predictor" in extra and cache != "min":
        assert total["prefetches_used"] > 0


def test_disk_store_is_written_once_and_reused(
    disk_store_dir, prompts, stock_run, demo_config, tmp_path
):
    """A later engine on the same store_dir reads the verified files without rewriting them,
    also from a copy of the checkpoint elsewhere with new file times (a re-download)."""
    options = {"cache_fraction": 0.25, "store": "disk", "store_dir": str(disk_store_dir)}
    if not layer_files(disk_store_dir):  # run alone: the disk engine above has not written it
        with open_engine("expertflow", options, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS):
            pass
    files = layer_files(disk_store_dir)
    assert len(files) == demo_config["num_hidden_layers"], "one file per MoE layer"
    copy = shutil.copytree(DEMO_MODEL, tmp_path / "downloaded-again")
    with open_engine(
        "expertflow", options, copy, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS
    ) as llm:
        outputs = llm.generate(prompts, greedy_params(32), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == stock_run.token_ids
    assert layer_files(disk_store_dir) == files
    [store] = list_stores(str(disk_store_dir))
    assert store.model == str(copy)  # the manifest names the checkpoint last served from it


def test_a_damaged_store_fails_with_the_reason_and_the_next_start_repairs_it(
    tmp_path, prompts, stock_run, capfd
):
    """Never tokens computed on bad bytes: stock's tokens, or an error naming the damage."""
    # Imported here: importing vLLM while tests are collected would come before
    # tests/kernels/conftest.py puts Triton in its interpreter.
    from vllm.v1.engine.exceptions import EngineDeadError

    options = {"cache_experts": 4, "store": "disk", "store_dir": str(tmp_path)}
    with open_engine("expertflow", options, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS) as llm:
        outputs = llm.generate(prompts[:2], greedy_params(8), use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == [
            ids[:8] for ids in stock_run.token_ids[:2]
        ]
        for path in layer_files(tmp_path):  # 128 B of every 4 KiB page, in place
            with open(path, "r+b") as f:
                for offset in range(0, os.path.getsize(path), 4096):
                    f.seek(offset)
                    f.write(b"\x00" * 128)
        # vLLM 0.32 ends the engine core on any error in a forward; the reason is in its log.
        with pytest.raises(EngineDeadError):
            llm.generate(prompts[:2], greedy_params(8), use_tqdm=False)
    logged = capfd.readouterr()
    assert "does not match its checksum" in logged.out + logged.err

    # A folder where a damaged layer's file belongs: only the worker finds it, rewriting the
    # layer. The caller gets the worker's line as its error, and no engine process stays.
    import psutil

    from vllm_expertflow.core.config import ExpertFlowConfigError

    (folder,) = {os.path.dirname(path) for path in layer_files(tmp_path)}
    blocked = os.path.join(folder, "layer_0.bin")
    os.unlink(blocked)
    os.mkdir(blocked)
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    with pytest.raises(ExpertFlowConfigError) as error:
        with open_engine("expertflow", options, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS):
            pass
    assert str(error.value).startswith(f"expertflow: writing the disk store failed at {blocked}")
    left = [c for c in psutil.Process().children(recursive=True) if c.pid not in before]
    assert not [c for c in left if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]

    # Cleared, the next start rewrites the damaged layers and gives stock's tokens.
    os.rmdir(blocked)
    with open_engine("expertflow", options, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS) as llm:
        outputs = llm.generate(prompts[:2], greedy_params(8), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == [
        ids[:8] for ids in stock_run.token_ids[:2]
    ]
