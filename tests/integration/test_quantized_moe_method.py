"""Int4 experts (GPTQ and AWQ, made by `vllm-expertflow quantize` with llm-compressor) served by
`moe_backend="expertflow"`: greedy tokens equal the stock backend's on the same experts.

The stock backend's int4 MoE kernel needs AMX, which CI's CPUs lack, so its reference run uses
the same checkpoint with the experts expanded to bf16 by compressed-tensors (`write_dequantized`):
identical expert values, stock kernel, no offloading.
"""

import json
import os
import shutil
from argparse import Namespace

import pytest
from conftest import MAX_NUM_BATCHED_TOKENS, QUANT_GROUP_SIZE

import vllm_expertflow
from vllm_expertflow.core.checkpoint import routing_config_hash
from vllm_expertflow.tools import quantize
from vllm_expertflow.tools.engine_runs import DEMO_MODEL, greedy_params, open_engine, run_greedy
from vllm_expertflow.tools.tiny_moe import build_tiny_moe

pytestmark = pytest.mark.engine

GROUP_SIZE = QUANT_GROUP_SIZE


@pytest.fixture(scope="module", params=["gptq", "awq"])
def quantized(request, quantized_demo):
    """A quantized demo model and its bf16-expanded reference (quantized once per session)."""
    method = request.param
    out, reference = quantized_demo(method)
    return method, out, reference


@pytest.fixture(scope="module")
def stock_tokens(quantized, prompts):
    _, _, reference = quantized
    return run_greedy(
        prompts, "auto", model=reference, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS
    ).token_ids


def packed_record_bytes(config: dict, symmetric: bool) -> int:
    hidden, inter = config["hidden_size"], config["moe_intermediate_size"]
    weights = 3 * hidden * inter // 2  # 4 bits each
    scales = 3 * hidden * inter // GROUP_SIZE * 2  # one bf16 per group
    zero_points = 0 if symmetric else scales // 4  # one 4-bit per group
    return weights + scales + zero_points


def test_quantized_checkpoint_holds_packed_experts_and_bf16_rest(quantized):
    method, out, _ = quantized
    config = json.loads((out / "config.json").read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    assert group["weights"]["num_bits"] == 4
    assert group["weights"]["group_size"] == GROUP_SIZE
    assert group["weights"]["symmetric"] == (method == "gptq")
    # A quarter of the experts' bytes, and more: attention and embeddings stay bf16.
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert size < 0.5 * (DEMO_MODEL / "model.safetensors").stat().st_size
    # Only the experts are quantized: the demo's predictors and traces serve it.
    assert routing_config_hash(str(out)) == routing_config_hash(str(DEMO_MODEL))


def test_greedy_tokens_match_stock_on_the_same_experts(
    quantized, stock_tokens, prompts, demo_config, tmp_path
):
    method, out, _ = quantized
    top_k = demo_config["num_experts_per_tok"]
    store = {"store": "disk", "store_dir": str(tmp_path)}
    options = {"cache_fraction": 0.25, **store}
    with open_engine(
        "expertflow", options, model=out, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS
    ) as llm:
        record = packed_record_bytes(demo_config, symmetric=method == "gptq")
        for size in ({"cache_fraction": 0.25}, {"cache_experts": top_k}):
            for int4_slots in ("bf16", "packed"):
                options = {**store, **size, "int4_slots": int4_slots}
                vllm_expertflow.reconfigure(llm, options)
                outputs = llm.generate(prompts, greedy_params(32), use_tqdm=False)
                assert [list(o.outputs[0].token_ids) for o in outputs] == stock_tokens, options
                total = vllm_expertflow.get_stats(llm)["total"]
                assert total["bytes_loaded"] == total["misses"] * record > 0
                assert (total["experts_decoded"] > 0) == (int4_slots == "packed")

        # The same bytes hold several times the experts packed, the decode scratch included.
        bf16_slot = 3 * demo_config["hidden_size"] * demo_config["moe_intermediate_size"] * 2
        budget = 40 * bf16_slot
        slots = {}
        for int4_slots in ("bf16", "packed"):
            vllm_expertflow.reconfigure(
                llm, {**store, "cache_bytes": budget, "int4_slots": int4_slots}
            )
            slots[int4_slots] = vllm_expertflow.get_stats(llm)["slots"]
        scratch = 2 * top_k * bf16_slot
        assert slots == {"bf16": 40, "packed": (budget - scratch) // record}

    # A corrupt layer file of the packed store is rebuilt from the checkpoint, never used.
    (store_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    with open(store_dir / "layer_3.bin", "r+b") as f:
        f.seek(4096 + 17)
        f.write(b"\x5a\xa5\x5a")
    mtime = os.stat(store_dir / "layer_3.bin").st_mtime_ns
    with open_engine(
        "expertflow", options, model=out, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS
    ) as llm:
        outputs = llm.generate(prompts, greedy_params(32), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == stock_tokens
    assert os.stat(store_dir / "layer_3.bin").st_mtime_ns != mtime


def test_a_mixtral_style_int4_checkpoint_is_served_with_stock_tokens(prompts, tmp_path):
    # Mixtral's experts are `block_sparse_moe.experts.N.w1/w2/w3` to vLLM's loader: a quantization
    # config written for Qwen's `mlp.experts.N.gate_proj` left them unquantized to vLLM, and
    # loading failed on `w2_weight_packed`.
    model = build_tiny_moe("mixtral", tmp_path / "mixtral")
    out = tmp_path / "mixtral-gptq"
    args = Namespace(
        model=model,
        method="gptq",
        bits=4,
        group_size=32,
        calibration=[DEMO_MODEL / "heldout_pydoc.txt"],
        samples=8,
        seq_len=128,
        out=out,
    )
    assert quantize.run(args) == 0
    reference = tmp_path / "mixtral-gptq-dequantized"
    quantize.write_dequantized(out, reference)
    batch = {"max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS}
    stock = run_greedy(prompts, "auto", model=reference, **batch).token_ids
    top_k = json.loads((model / "config.json").read_text())["num_experts_per_tok"]
    with open_engine(
        "expertflow", {"cache_fraction": 0.25, "store": "ram"}, model=out, **batch
    ) as llm:
        for size in ({"cache_fraction": 0.25}, {"cache_experts": top_k}):
            for int4_slots in ("bf16", "packed"):
                options = {"store": "ram", **size, "int4_slots": int4_slots}
                vllm_expertflow.reconfigure(llm, options)
                outputs = llm.generate(prompts, greedy_params(32), use_tqdm=False)
                assert [list(o.outputs[0].token_ids) for o in outputs] == stock, options
                assert vllm_expertflow.get_stats(llm)["total"]["misses"] > 0


def test_unsupported_quantized_experts_are_refused_in_one_line(quantized, tmp_path):
    _, out, _ = quantized
    channelwise = tmp_path / "channelwise"
    shutil.copytree(out, channelwise)
    config = json.loads((channelwise / "config.json").read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    group["weights"].update(strategy="channel", group_size=None)
    (channelwise / "config.json").write_text(json.dumps(config))
    # Refused where the engine config is built (pydantic wraps the error), before any load.
    with pytest.raises(ValueError) as error:
        with open_engine("expertflow", {"cache_fraction": 0.5}, model=channelwise):
            pass
    (line,) = [line for line in str(error.value).splitlines() if "expertflow:" in line]
    assert "int4 weights with group scales (W4A16), got 4-bit channel" in line
    assert "vllm-expertflow quantize" in line
