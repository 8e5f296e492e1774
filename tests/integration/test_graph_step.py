"""The graph step through the real engine: misses are computed from host memory inside the
kernel, the host books and loads between steps. On a CPU its Triton kernel runs in Triton's
interpreter, so the prompts are few and short; tests/gpu/check.py runs the kernels on a GPU."""

import math
import os

import pytest
from make_golden import LOGPROB_PROMPT_COUNT, prompt_logprobs

import vllm_expertflow
from vllm_expertflow.tools.engine_runs import greedy_params, held_out_prompts, open_engine

pytestmark = pytest.mark.engine

MAX_TOKENS = 4


@pytest.fixture(scope="module")
def interpreted_triton():
    """Set while the engines start: their worker processes import the kernels fresh."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    # Together longer than the kernel's 64-token batches: the prefill takes the chunked path.
    return held_out_prompts(count=LOGPROB_PROMPT_COUNT)


@pytest.fixture(scope="module")
def graph_engine(interpreted_triton):
    with open_engine("expertflow", {"cache_fraction": 1.0, "step": "graph"}) as llm:
        yield llm


def test_tokens_do_not_depend_on_the_cache_size(graph_engine, prompts, demo_config):
    top_k = demo_config["num_experts_per_tok"]
    expert_bytes = 3 * demo_config["hidden_size"] * demo_config["moe_intermediate_size"] * 2
    runs = {}
    for name, size in (
        ("1.0", {"cache_fraction": 1.0}),
        ("0.25", {"cache_fraction": 0.25}),
        ("min", {"cache_experts": top_k}),
    ):
        vllm_expertflow.reconfigure(graph_engine, {**size, "step": "graph"})
        outputs = graph_engine.generate(prompts, greedy_params(MAX_TOKENS), use_tqdm=False)
        runs[name] = (
            [list(o.outputs[0].token_ids) for o in outputs],
            vllm_expertflow.get_stats(graph_engine)["total"],
        )
    print({name: stats for name, (_, stats) in runs.items()})
    assert runs["0.25"][0] == runs["1.0"][0] and runs["min"][0] == runs["1.0"][0]
    for name, (_, total) in runs.items():
        assert total["hits"] + total["misses"] == total["lookups"] > 0
        assert total["prefetches_issued"] == 0
        if name == "1.0":  # filled when built: serving never loads
            assert total["misses"] == 0 and total["bytes_loaded"] == 0
        else:
            assert 0 < total["bytes_loaded"] <= total["misses"] * expert_bytes
    assert runs["0.25"][1]["hits"] > 0


def test_prompt_logprobs_match_the_stock_kernel(graph_engine, prompts, golden):
    # The stock engine's, on these prompts with the same engine arguments (make_golden.py).
    assert golden["prompt_logprobs"]["prompts"] == prompts
    expected = golden["outputs"]["prompt_logprobs"]["logprobs"]
    vllm_expertflow.reconfigure(graph_engine, {"cache_fraction": 0.25, "step": "graph"})
    actual = prompt_logprobs(graph_engine, prompts)
    pairs = zip(actual, expected, strict=True)
    diffs = [abs(a - b) for xs, ys in pairs for a, b in zip(xs, ys, strict=True)]
    print(f"max {max(diffs):.4f} mean {sum(diffs) / len(diffs):.5f} over {len(diffs)}")
    assert len(diffs) > 40
    assert max(diffs) < 0.5 and math.fsum(diffs) / len(diffs) < 0.05
