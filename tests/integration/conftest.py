import json
import os
from argparse import Namespace
from pathlib import Path

import pytest

# Defined beside the golden tokens it was used for: small enough that prefill is chunked.
from make_golden import MAX_NUM_BATCHED_TOKENS as MAX_NUM_BATCHED_TOKENS
from make_golden import golden_run, load_golden

from vllm_expertflow.tools.engine_runs import DEMO_MODEL, EngineRun, held_out_prompts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

QUANT_GROUP_SIZE = 64


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return held_out_prompts(DEMO_MODEL, count=8)


@pytest.fixture(scope="session")
def golden() -> dict:
    """golden/stock_tokens.json, refused in one line if made for other inputs (make_golden.py)."""
    try:
        return load_golden()
    except ValueError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def stock_run(golden, prompts) -> EngineRun:
    """vLLM's stock backend on `prompts`, greedy: from the golden file, which
    test_plugin.py::test_stock_engine_still_gives_the_golden_tokens checks against the engine."""
    assert golden["greedy"]["prompts"] == prompts
    return golden_run(golden)


@pytest.fixture(scope="session")
def demo_config() -> dict:
    """The demo model's config with `num_experts` under that name whatever the file calls it."""
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    config.setdefault("num_experts", config.get("num_local_experts"))
    return config


@pytest.fixture(scope="session")
def disk_store_dir(tmp_path_factory):
    """Shared by every engine of the session, so later ones reuse what the first wrote."""
    return tmp_path_factory.mktemp("expert-store")


@pytest.fixture(scope="session")
def quantized_demo(tmp_path_factory):
    """`quantized_demo(method)`: the demo model quantized by `vllm-expertflow quantize` (tiny
    calibration), and the same checkpoint with its experts expanded back to bf16 by
    compressed-tensors; made at most once per method in a session, whoever asks."""
    from vllm_expertflow.tools import quantize

    made: dict[str, tuple[Path, Path]] = {}

    def make(method: str) -> tuple[Path, Path]:
        if method not in made:
            out = tmp_path_factory.mktemp("quantized") / f"demo-{method}"
            args = Namespace(
                model=DEMO_MODEL,
                method=method,
                bits=4,
                group_size=QUANT_GROUP_SIZE,
                calibration=[DEMO_MODEL / "heldout_pydoc.txt"],
                samples=8,
                seq_len=128,
                out=out,
            )
            assert quantize.run(args) == 0
            reference = out.with_name(f"{out.name}-dequantized")
            quantize.write_dequantized(out, reference)
            made[method] = (out, reference)
        return made[method]

    return make
