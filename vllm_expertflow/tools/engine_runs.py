"""Running the real vLLM engine on a model with one MoE backend: shared by tests and the bench."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parents[2] / "examples" / "models" / "expertflow-demo-moe"
HELD_OUT_FILES = ("heldout_shakespeare.txt", "heldout_pydoc.txt")


@dataclass
class EngineRun:
    token_ids: list[list[int]]
    texts: list[str]
    stats: dict | None
    timings: dict[str, float] = field(default_factory=dict)


def held_out_prompts(model: Path = DEMO_MODEL, count: int = 8, chars: int = 160) -> list[str]:
    """Prompts cut from the text the demo model never trained on, alternating sources."""
    sources = []
    for name in HELD_OUT_FILES:
        text = (model / name).read_text()
        paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) >= chars]
        sources.append([p[:chars].rsplit(" ", 1)[0] for p in paragraphs])
    prompts = [source[i] for i in range(count) for source in sources]
    return prompts[:count]


def engine_kwargs(moe_backend: str, options: dict | None, enforce_eager: bool) -> dict:
    kwargs = dict(
        moe_backend=moe_backend,
        max_model_len=512,
        max_num_seqs=8,
        enforce_eager=enforce_eager,
        seed=0,
    )
    if options is not None:
        kwargs["additional_config"] = {"expertflow": options}
    return kwargs


def run_greedy(
    prompts: list[str],
    moe_backend: str = "auto",
    options: dict | None = None,
    model: Path = DEMO_MODEL,
    max_tokens: int = 32,
    enforce_eager: bool = True,
) -> EngineRun:
    """Starts an engine, decodes greedily, reads expertflow's stats, and shuts it down."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from vllm_expertflow import get_stats

    llm = LLM(str(model), **engine_kwargs(moe_backend, options, enforce_eager))
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        stats = get_stats(llm) if moe_backend == "expertflow" else None
        return EngineRun(
            token_ids=[list(o.outputs[0].token_ids) for o in outputs],
            texts=[o.outputs[0].text for o in outputs],
            stats=stats,
            timings={"generate_seconds": elapsed},
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
