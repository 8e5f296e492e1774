"""The plugin entry point: `expertflow` becomes a valid `moe_backend` everywhere vLLM checks it,
bad options fail where the config is built, and without the backend vLLM is untouched."""

import json
import subprocess
import sys

import pytest
from conftest import MAX_NUM_BATCHED_TOKENS

from vllm_expertflow.integration.plugin import register


def test_register_is_idempotent_and_extends_the_choices():
    register()
    register()
    from vllm.config.kernel import KernelConfig
    from vllm.engine.arg_utils import get_kwargs

    assert KernelConfig(moe_backend="expertflow").moe_backend == "expertflow"
    assert "expertflow" in get_kwargs(KernelConfig)["moe_backend"]["choices"]
    with pytest.raises(ValueError):
        KernelConfig(moe_backend="not-a-backend")


def test_vllm_serve_cli_accepts_the_backend():
    vllm = str(__import__("pathlib").Path(sys.executable).with_name("vllm"))
    out = subprocess.run([vllm, "serve", "--help=moe-backend"], capture_output=True, text=True)
    assert "expertflow" in out.stdout + out.stderr


def test_bad_options_fail_with_one_line_naming_the_valid_keys():
    register()
    from vllm.engine.arg_utils import EngineArgs

    from vllm_expertflow.tools.engine_runs import DEMO_MODEL

    args = EngineArgs(
        model=str(DEMO_MODEL),
        moe_backend="expertflow",
        additional_config={"expertflow": {"cache_fractoin": 0.5}},
    )
    with pytest.raises(ValueError, match="unknown option.*cache_fractoin.*valid options are"):
        args.create_engine_config()


@pytest.mark.engine
def test_stock_backend_is_unchanged_by_the_plugin(prompts, stock_run):
    """The stock run above had the plugin loaded; vLLM without any plugin gives the same tokens."""
    code = (
        "import json, sys\n"
        "from vllm_expertflow.tools.engine_runs import run_greedy\n"
        "if __name__ == '__main__':\n"
        f"    run = run_greedy(json.loads(sys.argv[1]), 'auto', "
        f"max_num_batched_tokens={MAX_NUM_BATCHED_TOKENS})\n"
        "    print('TOKENS=' + json.dumps(run.token_ids))\n"
    )
    env = {**__import__("os").environ, "VLLM_PLUGINS": ""}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(prompts)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    line = next(line for line in out.stdout.splitlines() if line.startswith("TOKENS="))
    assert json.loads(line.removeprefix("TOKENS=")) == stock_run.token_ids
