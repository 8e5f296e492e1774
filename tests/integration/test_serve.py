"""`vllm serve --moe-backend expertflow` over real HTTP returns the stock backend's tokens."""

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import requests
from conftest import MAX_NUM_BATCHED_TOKENS

from vllm_expertflow.serving.replica import EngineProcess, free_port
from vllm_expertflow.tools.engine_runs import DEMO_MODEL

pytestmark = pytest.mark.engine
STARTUP_SECONDS = 300


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The `vllm serve` process and its URL; the module's last test stops it with Ctrl-C."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    options = {
        "expertflow": {
            "cache_fraction": 0.25,
            "store": "disk",
            "store_dir": str(tmp_path_factory.mktemp("serve-store")),
        }
    }
    command = [
        str(Path(sys.executable).with_name("vllm")),
        "serve",
        str(DEMO_MODEL),
        "--moe-backend",
        "expertflow",
        "--additional-config",
        json.dumps(options),
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "8",
        "--max-num-batched-tokens",
        str(MAX_NUM_BATCHED_TOKENS),
        "--seed",
        "0",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    engine = EngineProcess(command, {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, str(log))
    base = f"http://127.0.0.1:{port}"
    try:
        engine.wait_until_up(base, STARTUP_SECONDS)
        yield engine, base
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def server(served):
    return served[1]


def expertflow_metrics(base: str) -> dict[str, float]:
    text = requests.get(f"{base}/metrics", timeout=30).text
    assert "vllm:num_requests_running" in text, "vLLM's own metrics are untouched"
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("expertflow_")
    }


def test_metrics_show_the_pool_before_any_request(server):
    values = expertflow_metrics(server)
    assert values["expertflow_slots"] == 48  # 0.25 of 6 layers x 32 experts
    assert values['expertflow_lookups_total{layer="all"}'] == 0


def test_completions_over_http_match_stock(server, prompts, stock_run):
    body = {
        "model": str(DEMO_MODEL),
        "prompt": prompts,
        "max_tokens": 32,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    response = requests.post(f"{server}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    assert [c["token_ids"] for c in choices] == stock_run.token_ids
    assert [c["text"] for c in choices] == stock_run.texts


def test_metrics_report_the_expert_cache(server, prompts, stock_run):
    body = {"model": str(DEMO_MODEL), "prompt": prompts[:2], "max_tokens": 8, "temperature": 0.0}
    assert requests.post(f"{server}/v1/completions", json=body, timeout=300).status_code == 200
    time.sleep(1.5)  # workers write a snapshot at most once a second
    values = expertflow_metrics(server)
    hits, misses = (values[f'expertflow_{n}_total{{layer="all"}}'] for n in ("hits", "misses"))
    assert hits > 0 and misses > 0
    assert values['expertflow_lookups_total{layer="all"}'] == hits + misses
    assert values['expertflow_bytes_loaded_total{layer="all"}'] > 0
    assert values["expertflow_slots"] == 48


async def stream_completion(client, base: str, prompt: str, chunks_before_leaving: int | None):
    """Streams one greedy completion; returns its token ids, or None if it left early."""
    body = {
        "model": str(DEMO_MODEL),
        "prompt": prompt,
        "max_tokens": 32,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    token_ids, chunks = [], 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            token_ids += json.loads(line.removeprefix("data: "))["choices"][0]["token_ids"]
            chunks += 1
            if chunks == chunks_before_leaving:
                return None  # the client disconnects mid-stream
    return token_ids


MALFORMED = [
    b"{not json",
    json.dumps({"model": str(DEMO_MODEL)}).encode(),  # no prompt
    json.dumps({"model": str(DEMO_MODEL), "prompt": "A", "max_tokens": -1}).encode(),
    json.dumps({"model": "no-such-model", "prompt": "A"}).encode(),
]


def test_a_loaded_server_with_faults_stays_healthy_and_exact(server, prompts, stock_run):
    """64 concurrent streaming clients, 20 of which leave after two chunks, with malformed
    requests mixed in: the server answers them 4xx, stays up, and every completed stream
    carries stock's tokens."""

    async def load() -> tuple[list, list[int]]:
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            streams = [
                stream_completion(
                    client, server, prompts[i % len(prompts)], 2 if i % 16 < 5 else None
                )
                for i in range(64)
            ]
            bad = [
                client.post(
                    f"{server}/v1/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                for body in MALFORMED * 2
            ]
            results = await asyncio.gather(*streams, *bad)
        return list(results[:64]), [r.status_code for r in results[64:]]

    completed, bad_statuses = asyncio.run(load())
    assert all(400 <= status < 500 for status in bad_statuses), bad_statuses
    assert sum(tokens is None for tokens in completed) == 20
    for i, tokens in enumerate(completed):
        if tokens is not None:
            assert tokens == stock_run.token_ids[i % len(prompts)], f"client {i}"
    assert requests.get(f"{server}/health", timeout=30).status_code == 200
    time.sleep(1.5)  # workers write a snapshot at most once a second
    values = expertflow_metrics(server)
    lookups, hits, misses = (
        values[f'expertflow_{name}_total{{layer="all"}}'] for name in ("lookups", "hits", "misses")
    )
    assert lookups == hits + misses > 0


def test_ctrl_c_logs_the_stats(served):
    """Last in this module: it stops the server as a user at the terminal would."""
    engine, _ = served
    engine.process.send_signal(signal.SIGINT)
    engine.process.wait(timeout=120)
    log = Path(engine.log_path).read_text()
    assert "expertflow stats: lookups=" in log
    # Each of our lines once: vLLM's CPU MoE code gives the worker's root logger a handler too.
    sizing = [line for line in log.splitlines() if "expert slots for" in line]
    assert len(sizing) == 1, sizing
