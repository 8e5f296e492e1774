"""The plugin entry point: `expertflow` becomes a valid `moe_backend` everywhere vLLM checks it,
bad options fail where the config is built, and without the backend vLLM is untouched."""

import subprocess
import sys

import pytest
from make_golden import GOLDEN, REGENERATE, greedy_outputs, open_stock_engine, prompt_logprobs

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


def test_our_records_reach_vllms_handlers_and_skip_a_closed_stream(capsys):
    import io
    import logging

    from vllm_expertflow.integration.plugin import _ToVllmHandlers

    # Outside our package's logger, which may already forward (register() ran in this process).
    vllm_logger, ours = logging.getLogger("vllm"), logging.getLogger("forwarding-test")
    ours.propagate = False
    open_stream, closed_stream = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(open_stream), logging.StreamHandler(closed_stream)]
    forwarder = _ToVllmHandlers()
    for handler in handlers:
        vllm_logger.addHandler(handler)
    ours.addHandler(forwarder)
    try:
        closed_stream.close()  # as pytest's capture is, when the exit hooks log the last stats
        ours.warning("expertflow: last stats")
    finally:
        ours.removeHandler(forwarder)
        for handler in handlers:
            vllm_logger.removeHandler(handler)
    assert open_stream.getvalue() == "expertflow: last stats\n"
    assert "Logging error" not in capsys.readouterr().err


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
def test_stock_engine_still_gives_the_golden_tokens(golden, stock_run):
    """The suite's one stock engine; the other tests compare with golden/stock_tokens.json.

    make_golden.py wrote that file from vLLM with no plugin loaded; this engine runs with
    ExpertFlow's plugin loaded. Equal outputs: the file is not stale, and the plugin leaves
    vLLM's stock backend untouched.
    """
    stale = (
        f"the stock backend's outputs differ from {GOLDEN.name}: the plugin changed the stock "
        f"backend, or vLLM's numbers changed and the file is stale (then `{REGENERATE}`)"
    )
    with open_stock_engine(golden["greedy"]) as llm:
        live = greedy_outputs(llm, golden["greedy"]["prompts"])
        # The graph step's reference, made at a 512-token batch budget with Triton's interpreter
        # on: the stock backend's prompt log-probs depend on neither (equal here on AVX512).
        logprobs = prompt_logprobs(llm, golden["prompt_logprobs"]["prompts"])
    assert live["token_ids"] == stock_run.token_ids, stale
    assert live["texts"] == stock_run.texts, stale
    expected = golden["outputs"]["prompt_logprobs"]["logprobs"]
    pairs = zip(logprobs, expected, strict=True)
    assert max(abs(a - b) for xs, ys in pairs for a, b in zip(xs, ys, strict=True)) < 1e-3, stale
