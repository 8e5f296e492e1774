"""Two ExpertFlow replicas of the demo model behind one Ray Serve endpoint, and a few requests.

Run from the repository root: `python examples/ray_serve_replicas.py`.
"""

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import httpx

from vllm_expertflow.serving.app import build_app, start, stop
from vllm_expertflow.tools.engine_runs import DEMO_MODEL, held_out_prompts


def complete(url: str, prompt: str) -> str:
    body = {"model": str(DEMO_MODEL), "prompt": prompt, "max_tokens": 24, "temperature": 0.0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    options = {"expertflow": {"cache_fraction": 0.25}}
    serve_args = ["--additional-config", json.dumps(options), "--enforce-eager",
                  "--max-model-len", "512", "--max-num-seqs", "8"]  # fmt: skip
    url = start(build_app(str(DEMO_MODEL), 2, serve_args, routing="expert-affinity"), port=8000)
    try:
        prompts = held_out_prompts(DEMO_MODEL, count=6)
        with ThreadPoolExecutor(len(prompts)) as pool:
            for prompt, text in zip(
                prompts, pool.map(lambda p: complete(url, p), prompts), strict=True
            ):
                print(f"{prompt[:50]!r} -> {text!r}")
        hits = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
                if line.startswith("expertflow_serve_requests_total")]  # fmt: skip
        print("\n".join(hits))
    finally:
        stop()


if __name__ == "__main__":
    main()
