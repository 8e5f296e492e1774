"""Offline batch generation with experts offloaded to a disk store.

Keeps a quarter of the demo model's routed experts resident; the rest are read from disk on
demand. Run: .venv/bin/python examples/offline_demo.py [MODEL]
(MODEL defaults to the demo model; an int4 checkpoint from `vllm-expertflow quantize` works too.)
"""

import os
import sys

from vllm import LLM, SamplingParams

import vllm_expertflow
from vllm_expertflow.tools.engine_runs import DEMO_MODEL

PROMPTS = [
    "ROMEO: But soft, what light through yonder window",
    "KING HENRY: Once more unto the breach, dear friends,",
    "The for statement in Python",
    "A class definition",
]

if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model = sys.argv[1] if len(sys.argv) > 1 else str(DEMO_MODEL)
    llm = LLM(
        model,
        moe_backend="expertflow",
        additional_config={"expertflow": {"cache_fraction": 0.25, "store": "disk"}},
        max_model_len=512,
    )
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0.0))
    for output in outputs:
        print(f"--- {output.prompt!r}\n{output.outputs[0].text}\n")
    total = vllm_expertflow.get_stats(llm)["total"]
    print(
        f"expert cache: {total['lookups']} lookups, hit rate {total['hit_rate']:.3f}, "
        f"{total['bytes_loaded'] / 2**20:.1f} MiB read from disk in {total['load_seconds']:.2f} s"
    )
