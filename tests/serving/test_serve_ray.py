"""Two Ray Serve replicas of the demo model behind one endpoint: answers, faults, metrics."""

import importlib.util
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from vllm_expertflow.tools.engine_runs import DEMO_MODEL, held_out_prompts

pytestmark = pytest.mark.engine

PORT = 18765
BASE = f"http://127.0.0.1:{PORT}"


def load_make_golden():
    """tests/integration/make_golden.py: the stock backend's golden tokens and their checks."""
    path = Path(__file__).resolve().parents[1] / "integration" / "make_golden.py"
    spec = importlib.util.spec_from_file_location("make_golden", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = load_make_golden()
MAX_NUM_BATCHED_TOKENS = make_golden.MAX_NUM_BATCHED_TOKENS


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return held_out_prompts(DEMO_MODEL, count=8)


@pytest.fixture(scope="module")
def stock(prompts):
    """The stock backend's greedy tokens on `prompts`, from tests/integration/golden/."""
    try:
        golden = make_golden.load_golden()
    except ValueError as error:
        pytest.fail(str(error), pytrace=False)
    assert golden["greedy"]["prompts"] == prompts
    return make_golden.golden_run(golden)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from vllm_expertflow.serving.app import build_app, start, stop

    options = {
        "expertflow": {
            "cache_fraction": 0.25,
            "store": "disk",
            "store_dir": str(tmp_path_factory.mktemp("ray-store")),
        }
    }
    serve_args = [
        "--additional-config", json.dumps(options),
        "--enforce-eager",
        "--max-model-len", "512",
        "--max-num-seqs", "8",
        "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS),
        "--seed", "0",
    ]  # fmt: skip
    start(build_app(str(DEMO_MODEL), 2, serve_args, "expert-affinity"), port=PORT)
    try:
        wait_healthy()
        yield BASE
    finally:
        stop()


def wait_healthy(seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while requests.get(f"{BASE}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "ingress never saw a healthy replica"
        time.sleep(1)


def complete(prompt: str, max_tokens: int = 32) -> requests.Response:
    body = {
        "model": str(DEMO_MODEL),
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    return requests.post(f"{BASE}/v1/completions", json=body, timeout=600)


def metric_values() -> dict[str, float]:
    text = requests.get(f"{BASE}/metrics", timeout=30).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("expertflow_")
    }


def test_concurrent_requests_match_a_stock_engine(app, prompts, stock):
    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(complete, prompts))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert [r.json()["choices"][0]["token_ids"] for r in responses] == stock.token_ids
    assert [r.json()["choices"][0]["text"] for r in responses] == stock.texts
    requests_per_replica = metric_values()
    assert requests_per_replica['expertflow_serve_requests_total{replica="0"}'] > 0
    assert requests_per_replica['expertflow_serve_requests_total{replica="1"}'] > 0


def test_bad_requests_get_vllms_errors(app):
    too_long = complete("word " * 2000)
    assert too_long.status_code == 400, too_long.text
    assert too_long.json()["error"]["type"] == "BadRequestError"
    bad = requests.post(f"{BASE}/v1/completions", json={"model": str(DEMO_MODEL)}, timeout=60)
    assert 400 <= bad.status_code < 500
    assert requests.get(f"{BASE}/v1/models", timeout=30).json()["data"][0]["id"] == str(DEMO_MODEL)
    assert complete("Still up?", max_tokens=4).status_code == 200


def test_metrics_sum_the_replicas_expert_caches(app):
    time.sleep(1.5)  # workers write a snapshot at most once a second
    values = metric_values()
    assert values['expertflow_hits_total{layer="all"}'] > 0
    assert values['expertflow_misses_total{layer="all"}'] > 0
    assert values["expertflow_slots"] == 2 * 48  # 0.25 of 6 layers x 32 experts, per replica


def test_killing_a_replica_mid_load_fails_no_request(app, prompts):
    import ray

    retries_before = metric_values()["expertflow_serve_retries_total"]
    victim = next(
        a for a in ray.util.list_named_actors(all_namespaces=True) if "#replica-0#" in a["name"]
    )
    load = prompts * 3
    with ThreadPoolExecutor(len(load)) as pool:
        futures = [pool.submit(complete, p, 48) for p in load]
        time.sleep(3)  # requests are in flight on both replicas
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * len(load), [r.text for r in responses]
    assert metric_values()["expertflow_serve_retries_total"] > retries_before
    deadline = time.monotonic() + 300
    while metric_values()['expertflow_serve_replica_up{replica="0"}'] != 1:  # Serve restarts it
        assert time.monotonic() < deadline, "replica 0 was not restarted"
        time.sleep(2)
