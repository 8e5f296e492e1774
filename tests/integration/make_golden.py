"""Golden tokens of vLLM's stock MoE backend on the demo model, so that the equivalence tests
start only the expertflow engine.

    OMP_NUM_THREADS=1 .venv/bin/python tests/integration/make_golden.py

runs the real stock engine (`moe_backend="auto"`, with vLLM's plugins off: pure vLLM) and
writes golden/stock_tokens.json atomically. The file records what the tokens depend on: the
vLLM and torch versions, the device and CPU capability, a fingerprint of the model's files, the
prompts, the sampling parameters and the engine arguments. `load_golden` refuses a file made
for anything else in one line that says how to regenerate it, and
test_plugin.py::test_stock_engine_still_gives_the_golden_tokens runs the stock engine again
(plugin loaded) and compares both parts, so the file cannot go stale silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from vllm_expertflow.core.files import write_text_atomically
from vllm_expertflow.tools.engine_runs import (
    DEMO_MODEL,
    EngineRun,
    engine_kwargs,
    greedy_params,
    held_out_prompts,
    open_engine,
)

GOLDEN = Path(__file__).resolve().parent / "golden" / "stock_tokens.json"
REGENERATE = "OMP_NUM_THREADS=1 .venv/bin/python tests/integration/make_golden.py"
# Small enough that prefill is chunked: steps mix prefill chunks with other requests' decodes.
MAX_NUM_BATCHED_TOKENS = 64
MAX_TOKENS = 32
# test_graph_step.py: prompt log-probs of two short prompts, vLLM's default batch budget, with
# Triton's interpreter on while the engine starts (as it is for the graph-step engine).
LOGPROB_PROMPT_COUNT = 2
LOGPROB_MAX_NUM_BATCHED_TOKENS = 512
LOGPROB_ENV = {"TRITON_INTERPRET": "1"}
# Files of the model folder the tokens depend on (the held-out texts enter through the prompts).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def model_fingerprint(model: Path = DEMO_MODEL) -> dict[str, str]:
    names = sorted({*MODEL_FILES, *(p.name for p in model.glob("*.safetensors"))})
    return {
        name: hashlib.sha256((model / name).read_bytes()).hexdigest()
        for name in names
        if (model / name).exists()
    }


def environment() -> dict[str, Any]:
    """What the stock kernels' numerics depend on besides the model and the requests."""
    import torch
    from vllm import __version__ as vllm_version
    from vllm.platforms import current_platform

    amx = getattr(torch._C._cpu, "_is_amx_tile_supported", lambda: False)()
    return {
        "vllm": vllm_version,
        "torch": torch.__version__,
        "device": current_platform.device_type,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx": bool(amx),
    }


def logprob_params() -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)


def greedy_spec(prompts: list[str]) -> dict[str, Any]:
    return {
        "prompts": prompts,
        "sampling": repr(greedy_params(MAX_TOKENS)),
        "engine": engine_kwargs("auto", None, True, MAX_NUM_BATCHED_TOKENS),
        "env": {},
    }


def logprob_spec(prompts: list[str]) -> dict[str, Any]:
    return {
        "prompts": prompts,
        "sampling": repr(logprob_params()),
        "engine": engine_kwargs("auto", None, True, LOGPROB_MAX_NUM_BATCHED_TOKENS),
        "env": LOGPROB_ENV,
    }


def expected_header() -> dict[str, Any]:
    """Everything the golden file must have been made for, computed here and now."""
    return {
        "environment": environment(),
        "model": {
            "path": str(DEMO_MODEL.relative_to(GOLDEN.parents[3])),
            "files_sha256": model_fingerprint(DEMO_MODEL),
        },
        "greedy": greedy_spec(held_out_prompts(DEMO_MODEL, count=8)),
        "prompt_logprobs": logprob_spec(held_out_prompts(DEMO_MODEL, count=LOGPROB_PROMPT_COUNT)),
    }


def first_difference(expected: Any, found: Any, where: str = "") -> str | None:
    """The first path at which two JSON values differ, e.g. `environment.vllm`."""
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in sorted(expected.keys() | found.keys()):
            diff = first_difference(expected.get(key), found.get(key), f"{where}.{key}")
            if diff:
                return diff
        return None
    if isinstance(expected, list) and isinstance(found, list) and len(expected) == len(found):
        for i, (e, f) in enumerate(zip(expected, found, strict=True)):
            diff = first_difference(e, f, f"{where}[{i}]")
            if diff:
                return diff
        return None
    return None if expected == found else where.lstrip(".")


def load_golden(path: Path = GOLDEN) -> dict[str, Any]:
    """The golden file, after checking it was made for this vLLM, model, prompts and params.

    Raises ValueError with one line naming the first mismatch and the command that regenerates.
    """
    if not path.exists():
        raise ValueError(f"{path} is missing: regenerate it with `{REGENERATE}`")
    golden = json.loads(path.read_text())
    expected = expected_header()
    found = {key: golden.get(key) for key in expected}
    diff = first_difference(expected, found)
    if diff is not None:
        raise ValueError(
            f"{path.name} was made for different inputs ({diff} differs): "
            f"regenerate it with `{REGENERATE}`"
        )
    return golden


def golden_run(golden: dict[str, Any]) -> EngineRun:
    outputs = golden["outputs"]["greedy"]
    return EngineRun(token_ids=outputs["token_ids"], texts=outputs["texts"], stats=None)


def prompt_logprobs(llm: Any, prompts: list[str]) -> list[list[float]]:
    """Log-prob of each prompt token after the first, as the engine scores the prompt."""
    outputs = llm.generate(prompts, logprob_params(), use_tqdm=False)
    return [[next(iter(p.values())).logprob for p in o.prompt_logprobs[1:]] for o in outputs]


def greedy_outputs(llm: Any, prompts: list[str]) -> dict[str, list]:
    outputs = llm.generate(prompts, greedy_params(MAX_TOKENS), use_tqdm=False)
    return {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
    }


def open_stock_engine(spec: dict[str, Any]) -> Any:
    engine = spec["engine"]
    return open_engine(
        "auto", None, DEMO_MODEL, engine["enforce_eager"], engine["max_num_batched_tokens"]
    )


def run_stock(spec: dict[str, Any], logprobs: bool = False) -> dict[str, Any]:
    """The stock engine on `spec`'s prompts and engine arguments, with `spec`'s environment."""
    saved = {key: os.environ.get(key) for key in spec["env"]}
    os.environ.update(spec["env"])
    try:
        with open_stock_engine(spec) as llm:
            if logprobs:
                return {"logprobs": prompt_logprobs(llm, spec["prompts"])}
            return greedy_outputs(llm, spec["prompts"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main() -> int:
    # Pure vLLM: the plugin must not be loaded in the reference (test_plugin.py checks that
    # loading it leaves the stock backend's tokens unchanged).
    os.environ["VLLM_PLUGINS"] = ""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    header = expected_header()
    golden = {
        "regenerate": REGENERATE,
        **header,
        "outputs": {
            "greedy": run_stock(header["greedy"]),
            "prompt_logprobs": run_stock(header["prompt_logprobs"], logprobs=True),
        },
    }
    write_text_atomically(GOLDEN, json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
