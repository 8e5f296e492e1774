"""`support.check`: what the backend cannot serve is refused where vLLM's config is built."""

import json
from types import SimpleNamespace

import pytest

from vllm_expertflow.integration.plugin import register
from vllm_expertflow.integration.support import unsupported_feature


@pytest.mark.parametrize(
    "config, feature",
    [
        (SimpleNamespace(model_type="qwen3_moe", num_experts=32), None),
        (SimpleNamespace(model_type="qwen2_moe", shared_expert_intermediate_size=64), "shared"),
        (SimpleNamespace(model_type="deepseek_v3", n_shared_experts=1), "shared"),
        (SimpleNamespace(model_type="deepseek_v2", n_shared_experts=0), None),
        (SimpleNamespace(text_config=SimpleNamespace(model_type="llama4_text")), "shared"),
        (SimpleNamespace(model_type="gpt_oss"), "expert biases"),
    ],
)
def test_features_are_read_from_the_hf_config(config, feature):
    found = unsupported_feature(config)
    assert (found is None) if feature is None else feature in found


def test_a_shared_expert_model_is_refused_in_one_line_before_any_engine_starts(tmp_path):
    register()
    from vllm.engine.arg_utils import EngineArgs

    config = {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = EngineArgs(model=str(tmp_path), moe_backend="expertflow", skip_tokenizer_init=True)
    with pytest.raises(ValueError) as error:
        args.create_engine_config()
    # pydantic wraps it in its validation error; the reason and the fix are one line of it.
    line = next(line for line in str(error.value).splitlines() if "expertflow:" in line)
    assert "has shared experts" in line and "use another --moe-backend" in line
    # The stock backend still builds its config for the same model.
    stock = EngineArgs(model=str(tmp_path), skip_tokenizer_init=True).create_engine_config()
    assert stock.kernel_config.moe_backend == "auto"


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
