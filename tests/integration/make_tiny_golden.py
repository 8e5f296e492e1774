"""Golden stock tokens of the tiny MoE families (vllm_expertflow/tools/tiny_moe.py).

    OMP_NUM_THREADS=1 .venv/bin/python tests/integration/make_tiny_golden.py

builds each family, runs vLLM's stock backend on it with plugins off (one process per family,
so a family stock vLLM cannot run does not take the others down) and writes
golden/tiny_moe_tokens.json atomically: per family the model's fingerprint and the tokens, or
the error stock vLLM fails with here. test_architectures.py starts only the expertflow engine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from make_golden import environment, model_fingerprint

from vllm_expertflow.core.files import write_text_atomically
from vllm_expertflow.tools.engine_runs import run_greedy
from vllm_expertflow.tools.tiny_moe import FAMILIES, build_tiny_moe

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_moe_tokens.json"
REGENERATE = "OMP_NUM_THREADS=1 .venv/bin/python tests/integration/make_tiny_golden.py"
PROMPTS = ["ROMEO: But soft, what light", "The for statement in Python", "A class", "KING"]
MAX_TOKENS = 12
# Smaller than the prompts: prefill is chunked and mixed with other requests' decodes.
MAX_NUM_BATCHED_TOKENS = 16


def stock_tokens(model: Path) -> list[list[int]]:
    return run_greedy(
        PROMPTS, "auto", None, model, MAX_TOKENS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS
    ).token_ids


def stock_result(family: str, model: Path) -> dict[str, Any]:
    """Stock's tokens, or its error, from a process of its own."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", family, str(model)],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_PLUGINS": ""},
        timeout=900,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if lines:
        return {"token_ids": json.loads(lines[-1].removeprefix("RESULT "))}
    # The worker's root cause, as the engine core reports it.
    causes = re.findall(r"Worker failed with error '(.*?)', please", out.stdout + out.stderr)
    return {"stock_error": causes[0] if causes else (out.stdout + out.stderr)[-300:]}


def main() -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    families = {}
    with tempfile.TemporaryDirectory() as folder:
        for family in FAMILIES:
            model = build_tiny_moe(family, Path(folder) / family)
            families[family] = {
                "fingerprint": model_fingerprint(model),
                **stock_result(family, model),
            }
            print(family, "tokens" if "token_ids" in families[family] else "stock error")
    golden = {
        "regenerate": REGENERATE,
        "environment": environment(),
        "prompts": PROMPTS,
        "max_tokens": MAX_TOKENS,
        "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
        "families": families,
    }
    write_text_atomically(GOLDEN, json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print("RESULT " + json.dumps(stock_tokens(Path(sys.argv[3]))))
        sys.exit(0)
    sys.exit(main())
