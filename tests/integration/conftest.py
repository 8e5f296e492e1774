import json
import os

import pytest

from vllm_expertflow.tools.engine_runs import DEMO_MODEL, EngineRun, held_out_prompts, run_greedy

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# Small enough that prefill is chunked: steps mix prefill chunks with other requests' decodes.
MAX_NUM_BATCHED_TOKENS = 64


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return held_out_prompts(DEMO_MODEL, count=8)


@pytest.fixture(scope="session")
def stock_run(prompts) -> EngineRun:
    return run_greedy(prompts, "auto", max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS)


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
