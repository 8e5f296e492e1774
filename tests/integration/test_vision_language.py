"""A vision-language MoE: charts drawn with matplotlib go through vLLM's stock vision tower, the
language model's routed experts are offloaded, and greedy tokens equal the stock backend's.

The model is a tiny random Aria (tools/tiny_moe.py says why Aria rather than Qwen3-VL-MoE):
Idefics3 vision tower, projector, MoE language model with a shared expert. Image prompts are
batched with text prompts, and prefills (256 image tokens each) are chunked.
"""

import io
import json

import pytest

from vllm_expertflow import get_stats, reconfigure
from vllm_expertflow.core.model_shape import MoEShape
from vllm_expertflow.tools.engine_runs import greedy_params, open_engine
from vllm_expertflow.tools.tiny_moe import IMAGE_TOKEN, build_tiny_vlm

pytestmark = pytest.mark.engine

ENGINE = {"max_num_batched_tokens": 64, "limit_mm_per_prompt": {"image": 1}}


def chart(title: str, values: list[int]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    figure, axes = plt.subplots(figsize=(4, 3), dpi=80)
    axes.bar(["north", "south", "east"], values)
    axes.set_title(title)
    png = io.BytesIO()
    figure.savefig(png, format="png")
    plt.close(figure)
    return Image.open(png).convert("RGB")


def prompts() -> list:
    question = f"{IMAGE_TOKEN}Which region sold the most?"
    charts = [chart("sales", [3, 7, 5]), chart("sales", [6, 1, 2]), chart("costs", [2, 2, 9])]
    return [
        *({"prompt": question, "multi_modal_data": {"image": image}} for image in charts),
        {"prompt": "def add(a, b):"},
        {"prompt": "The quarterly report shows"},
    ]


def generate(llm) -> list[list[int]]:
    outputs = llm.generate(prompts(), greedy_params(24), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm") / "aria")


@pytest.fixture(scope="module")
def stock_tokens(model):
    with open_engine("auto", None, model, **ENGINE) as llm:
        return generate(llm)


def test_the_image_reaches_the_language_model(stock_tokens):
    # Same question, different charts: different answers, so the vision tower's output is used.
    assert len({tuple(tokens) for tokens in stock_tokens[:3]}) == 3


def test_offloaded_tokens_equal_stock_with_images_in_the_prompts(model, stock_tokens, tmp_path):
    top_k = MoEShape.of(json.loads((model / "config.json").read_text())).top_k
    store = {"store": "disk", "store_dir": str(tmp_path)}
    with open_engine("expertflow", {**store, "cache_fraction": 0.25}, model, **ENGINE) as llm:
        for size in ({"cache_fraction": 0.25}, {"cache_experts": top_k}):
            reconfigure(llm, {**store, **size})  # fresh statistics for each cache size
            assert generate(llm) == stock_tokens, size
            stats = get_stats(llm)
            assert sorted(int(layer) for layer in stats["layers"]) == [0, 1, 2]
            assert stats["total"]["misses"] > 0
