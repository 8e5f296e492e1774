"""The prompt-to-experts estimate on the demo model's checkpoint."""

import json

import pytest

from vllm_expertflow.serving.exposition import sum_metrics
from vllm_expertflow.serving.prediction import PromptExpertPredictor, prompt_text
from vllm_expertflow.tools.engine_runs import DEMO_MODEL, held_out_prompts


@pytest.fixture(scope="module")
def predictor() -> PromptExpertPredictor:
    return PromptExpertPredictor(str(DEMO_MODEL))


def overlap(a: dict, b: dict) -> float:
    return sum(min(a.get(k, 0.0), b.get(k, 0.0)) for k in a.keys() | b.keys())


def test_demand_covers_every_moe_layer_and_sums_to_one(predictor):
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    demand = predictor.predict("To be, or not to be, that is the question")
    assert {layer for layer, _ in demand} == set(range(config["num_hidden_layers"]))
    assert sum(demand.values()) == pytest.approx(1.0)
    assert predictor.predict("") == {}


def test_same_domain_prompts_share_more_experts(predictor):
    # held_out_prompts alternates Shakespeare and Python docs.
    prompts = held_out_prompts(DEMO_MODEL, count=8)
    demands = [predictor.predict(p) for p in prompts]
    same = [overlap(demands[i], demands[i + 2]) for i in range(6)]
    other = [overlap(demands[i], demands[i + 1]) for i in range(7)]
    assert sum(same) / len(same) > sum(other) / len(other)


def test_prompt_text_reads_completions_and_chat_bodies():
    assert prompt_text({"prompt": "a"}) == "a"
    assert prompt_text({"prompt": ["a", "b"]}) == "a\nb"
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert prompt_text(chat) == "hi"
    assert prompt_text({"prompt": 5}) == ""


def test_sum_metrics_adds_replicas_samples():
    text = (
        "# HELP expertflow_hits x\n# TYPE expertflow_hits counter\n"
        'expertflow_hits_total{layer="all"} 3.0\n'
        "# HELP expertflow_slots y\n# TYPE expertflow_slots gauge\nexpertflow_slots 48.0\n"
    )
    summed = sum_metrics([text, text])
    assert 'expertflow_hits_total{layer="all"} 6.0' in summed
    assert "expertflow_slots 96.0" in summed
    assert sum_metrics([]) == ""
