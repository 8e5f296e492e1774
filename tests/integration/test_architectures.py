"""Every MoE family vLLM's stock backend runs here gives stock's greedy tokens when offloaded.

Tiny random instances (vllm_expertflow/tools/tiny_moe.py) at the smallest cache (the model's
top-k: every layer runs in rounds), against stock's tokens in golden/tiny_moe_tokens.json
(make_tiny_golden.py). Families stock vLLM cannot run on this machine are skipped with stock's
own error; families the backend refuses are refused where the config is built.
"""

import json

import pytest
from make_golden import environment, first_difference, model_fingerprint
from make_tiny_golden import GOLDEN, MAX_NUM_BATCHED_TOKENS, MAX_TOKENS, PROMPTS, REGENERATE

from vllm_expertflow.core.model_shape import MoEShape
from vllm_expertflow.tools.engine_runs import run_greedy
from vllm_expertflow.tools.tiny_moe import FAMILIES, build_tiny_moe

# The MoE layers' real ids: dense first layers and interleaved MoE layers are not offloaded.
MOE_LAYERS = {
    "qwen3_moe": [1, 2],  # mlp_only_layers [0]
    "deepseek_v2": [1, 2],
    "deepseek_v3": [1, 2],
    "glm4_moe": [1, 2],  # first_k_dense_replace 1
    "llama4_text": [1, 3],  # MoE on every other layer
}
REFUSED = {"gpt_oss": "has expert biases"}


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
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in REFUSED])
def test_offloaded_tokens_equal_stock_at_the_smallest_cache(golden, models, family):
    stock = expected(golden, models, family)
    config = json.loads((models[family] / "config.json").read_text())
    top_k = MoEShape.of(config).top_k
    run = run_greedy(
        PROMPTS,
        "expertflow",
        {"cache_experts": top_k},
        models[family],
        MAX_TOKENS,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
    )
    assert run.token_ids == stock
    layers = sorted(int(layer) for layer in run.stats["layers"])
    assert layers == MOE_LAYERS.get(family, [0, 1, 2])
    assert run.stats["total"]["misses"] > 0


@pytest.mark.parametrize("family, reason", REFUSED.items())
def test_what_the_backend_cannot_offload_is_refused_where_the_config_is_built(
    golden, models, family, reason
):
    expected(golden, models, family)  # stock runs it
    from vllm.engine.arg_utils import EngineArgs

    from vllm_expertflow.integration.plugin import register

    register()
    args = EngineArgs(model=str(models[family]), moe_backend="expertflow")
    with pytest.raises(ValueError, match=reason):
        args.create_engine_config()
