"""Running the real vLLM engine on a model with one MoE backend: shared by tests and the bench."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEMO_MODEL = EXAMPLES / "models" / "expertflow-demo-moe"
# Beside the model, not in it: vLLM loads every .safetensors file of a model folder.
DEMO_PREDICTORS = EXAMPLES / "predictors" / "expertflow-demo-moe"
HELD_OUT_FILES = ("heldout_shakespeare.txt", "heldout_pydoc.txt")


@dataclass
class EngineRun:
    token_ids: list[list[int]]
    texts: list[str]
    stats: dict | None


def held_out_prompts(model: Path = DEMO_MODEL, count: int = 8, chars: int = 160) -> list[str]:
    """Prompts cut from the text the demo model never trained on, alternating sources."""
    sources = []
    for name in HELD_OUT_FILES:
        text = (model / name).read_text()
        paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) >= chars]
        sources.append([p[:chars].rsplit(" ", 1)[0] for p in paragraphs])
    prompts = [source[i] for i in range(count) for source in sources]
    return prompts[:count]


def engine_kwargs(
    moe_backend: str,
    options: dict | None,
    enforce_eager: bool,
    max_num_batched_tokens: int,
    **extra: Any,
) -> dict:
    kwargs = {
        "max_model_len": 512,
        "max_num_seqs": 8,
        "seed": 0,
        **extra,  # callers may override the defaults above
        "moe_backend": moe_backend,
        "max_num_batched_tokens": max_num_batched_tokens,
        "enforce_eager": enforce_eager,
    }
    if options is not None:
        kwargs["additional_config"] = {"expertflow": options}
    return kwargs


@contextmanager
def open_engine(
    moe_backend: str = "auto",
    options: dict | None = None,
    model: Path = DEMO_MODEL,
    enforce_eager: bool = True,
    max_num_batched_tokens: int = 512,
    **extra: Any,
) -> Iterator[Any]:
    """A real vLLM `LLM` on `model`, shut down (engine process included) on exit."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    llm = LLM(
        str(model),
        **engine_kwargs(moe_backend, options, enforce_eager, max_num_batched_tokens, **extra),
    )
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def greedy_params(max_tokens: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_greedy(
    prompts: list[str],
    moe_backend: str = "auto",
    options: dict | None = None,
    model: Path = DEMO_MODEL,
    max_tokens: int = 32,
    enforce_eager: bool = True,
    max_num_batched_tokens: int = 512,
) -> EngineRun:
    """Starts an engine, decodes greedily, reads expertflow's stats, and shuts it down.

    A `max_num_batched_tokens` below the prompts' total splits prefills into chunks, so steps
    mix one request's prefill with others' decodes, as continuous batching does under load.
    """
    from vllm_expertflow import get_stats

    with open_engine(moe_backend, options, model, enforce_eager, max_num_batched_tokens) as llm:
        outputs = llm.generate(prompts, greedy_params(max_tokens), use_tqdm=False)
        return EngineRun(
            token_ids=[list(o.outputs[0].token_ids) for o in outputs],
            texts=[o.outputs[0].text for o in outputs],
            stats=get_stats(llm) if moe_backend == "expertflow" else None,
        )
