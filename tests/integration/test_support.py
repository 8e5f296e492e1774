"""`support.check`: what the backend cannot serve is refused where vLLM's config is built."""

from types import SimpleNamespace

import pytest

from vllm_expertflow.integration.plugin import register
from vllm_expertflow.integration.support import has_expert_biases


@pytest.mark.parametrize(
    "config, biased",
    [
        (SimpleNamespace(model_type="qwen3_moe", num_experts=32), False),
        (SimpleNamespace(model_type="qwen2_moe", shared_expert_intermediate_size=64), False),
        (SimpleNamespace(text_config=SimpleNamespace(model_type="llama4_text")), False),
        (SimpleNamespace(model_type="gpt_oss"), True),
        (SimpleNamespace(text_config=SimpleNamespace(model_type="gpt_oss")), True),
    ],
)
def test_expert_biases_are_read_from_the_hf_config(config, biased):
    assert has_expert_biases(config) == biased


@pytest.mark.parametrize(
    "options, message",
    [
        ({"cache_experts": 3}, "cache_experts=3 is smaller than the model's top-k of 4"),
        ({"predictor": "/nonexistent/p.safetensors"}, "p.safetensors does not exist"),
        (
            {"policy": "static", "static_experts": "/nonexistent/hot.json"},
            "hot.json does not exist",
        ),
        ({"store": "disk", "store_dir": "/proc/version"}, "is not a directory"),
    ],
)
def test_llm_refuses_in_the_callers_process_and_starts_no_engine(options, message):
    import psutil
    from vllm import LLM

    from vllm_expertflow.tools.engine_runs import DEMO_MODEL

    register()
    # Engines other tests of this session keep (session fixtures) are not this test's.
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match=message):
        LLM(str(DEMO_MODEL), moe_backend="expertflow", additional_config={"expertflow": options})
    started = {child.pid for child in psutil.Process().children(recursive=True)} - before
    assert not started, f"processes left behind: {started}"


def test_a_model_without_routed_experts_is_refused_where_the_config_is_built(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from vllm.engine.arg_utils import EngineArgs

    from vllm_expertflow.tools.engine_runs import DEMO_MODEL

    dense = AutoConfig.for_model(
        "qwen3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=4096,
    )
    AutoModelForCausalLM.from_config(dense, dtype=torch.bfloat16).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((DEMO_MODEL / name).read_bytes())
    register()
    args = EngineArgs(model=str(tmp_path), moe_backend="expertflow")
    with pytest.raises(ValueError, match="has no routed experts .* nothing to offload"):
        args.create_engine_config()
    EngineArgs(model=str(tmp_path)).create_engine_config()  # stock backends are untouched
