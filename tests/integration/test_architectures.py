"""Every MoE family vLLM's stock backend runs here gives stock's greedy tokens when offloaded.

Tiny random instances (vllm_expertflow/tools/tiny_moe.py), one expertflow engine each on a disk
store, at a quarter of the experts resident and then (reconfigured) at the smallest cache (the
model's top-k: every layer runs in rounds), against stock's tokens in golden/tiny_moe_tokens.json
(make_tiny_golden.py). Prompts are batched and their prefills chunked. Families stock vLLM
cannot run on this machine are skipped with stock's own error.
"""

import json

import pytest
from make_golden import environment, first_difference, model_fingerprint
from make_tiny_golden import GOLDEN, MAX_NUM_BATCHED_TOKENS, MAX_TOKENS, PROMPTS, REGENERATE

from vllm_expertflow import get_stats, reconfigure
from vllm_expertflow.core.model_shape import MoEShape
from vllm_expertflow.core.tracer import read_trace
from vllm_expertflow.tools.engine_runs import greedy_params, open_engine
from vllm_expertflow.tools.tiny_moe import FAMILIES, build_tiny_moe
from vllm_expertflow.tools.trace import model_metadata

# The MoE layers' real ids: dense first layers and interleaved MoE layers are not offloaded.
MOE_LAYERS = {
    "qwen3_moe": [1, 2],  # mlp_only_layers [0]
    "deepseek_v2": [1, 2],
    "deepseek_v3": [1, 2],
    "glm4_moe": [1, 2],  # first_k_dense_replace 1
    "llama4_text": [1, 3],  # MoE on every other layer
}


@pytest.fixture(scope="module")
def golden():
    data = json.loads(GOLDEN.read_text())
    diff = first_difference(environment(), data["environment"])
    if diff is not None:
        pytest.fail(f"{GOLDEN.name} was made elsewhere ({diff} differs): `{REGENERATE}`")
    return data["families"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-moe")
    return {family: build_tiny_moe(family, folder / family) for family in FAMILIES}


def expected(golden, models, family):
    entry = golden[family]
    if model_fingerprint(models[family]) != entry["fingerprint"]:
        pytest.fail(
            f"the tiny {family} model is not the one {GOLDEN.name} was made from: `{REGENERATE}`"
        )
    if "stock_error" in entry:
        pytest.skip(f"vLLM's stock backend cannot run {family} here: {entry['stock_error']}")
    return entry["token_ids"]


@pytest.mark.engine
@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_tokens_equal_stock_at_a_quarter_and_at_the_smallest_cache(
    golden, models, family, tmp_path
):
    stock = expected(golden, models, family)
    config = json.loads((models[family] / "config.json").read_text())
    top_k = MoEShape.of(config).top_k
    store = {"store": "disk", "store_dir": str(tmp_path)}
    with open_engine(
        "expertflow",
        {**store, "cache_fraction": 0.25},
        models[family],
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
    ) as llm:
        for options in ({"cache_fraction": 0.25}, {"cache_experts": top_k}):
            reconfigure(llm, {**store, **options})  # fresh statistics for each cache size
            outputs = llm.generate(PROMPTS, greedy_params(MAX_TOKENS), use_tqdm=False)
            assert [list(o.outputs[0].token_ids) for o in outputs] == stock, options
            stats = get_stats(llm)
            layers = sorted(int(layer) for layer in stats["layers"])
            assert layers == MOE_LAYERS.get(family, [0, 1, 2])
            assert stats["total"]["misses"] > 0


@pytest.mark.engine
@pytest.mark.parametrize("family", ["llama4_text", "gpt_oss"])
def test_a_trace_records_the_real_moe_layers_and_routing_width(models, family, tmp_path):
    """Llama-4: top-1, MoE on every other layer; gpt-oss: biased experts, every layer."""
    shape = MoEShape.of(json.loads((models[family] / "config.json").read_text()))
    with open_engine("expertflow", {"cache_fraction": 1.0}, models[family]) as llm:
        metadata = model_metadata(models[family])
        llm.collective_rpc("expertflow_start_tracing", args=(str(tmp_path), metadata, 1000, 1.0, 0))
        llm.generate(PROMPTS[:1], greedy_params(2), use_tqdm=False)
        manifest = llm.collective_rpc("expertflow_stop_tracing")[0]
    assert manifest["layers"] == MOE_LAYERS.get(family, [0, 1, 2])
    assert (manifest["num_experts"], manifest["top_k"]) == (shape.num_experts, shape.top_k)
    _, tensors = read_trace(str(tmp_path))
    assert {k for k in tensors if k.startswith("topk_ids.")} == {
        f"topk_ids.{layer}" for layer in manifest["layers"]
    }
    assert all(tensors[f"topk_ids.{layer}"].shape[1] == shape.top_k for layer in manifest["layers"])
