"""`vllm-expertflow load-test --url URL`: bounded concurrent load on an OpenAI-compatible server.

`--clients` concurrent clients send `--requests` greedy completions between them. Reports the
errors (any non-200 answer or failed request), p50/p99 latency and throughput, and the
ExpertFlow cache hit rate over the run when the server exports `expertflow_*` metrics. With
`--compare-url` the same requests then go to a second server and the greedy outputs must be
equal request by request. Exits non-zero on any error or mismatch.

Workloads, from the demo model's held-out texts: `repeat` cycles a few prompts that alternate
between Shakespeare and Python docs; `affinity` interleaves every held-out paragraph of both,
so a router that keeps each kind on its own replica can raise the expert cache hit rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from .engine_runs import DEMO_MODEL, HELD_OUT_FILES, held_out_prompts

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: int  # 0 when no HTTP response came back
    seconds: float
    output: list[int] | str | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class RunReport:
    url: str
    requests: int
    errors: int
    p50_s: float
    p99_s: float
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    hit_rate: float | None
    error_samples: list[str] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--compare-url", help="second server: greedy outputs must match --url")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--workload", choices=("repeat", "affinity"), default="repeat")
    parser.add_argument("--prompt-model", type=Path, default=DEMO_MODEL, help="held-out texts")
    parser.add_argument("--model", help="model name in requests (default: the server's first)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--json-out", type=Path, default=Path("load_test.json"))


def workload_prompts(kind: str, model_dir: Path, chars: int = 160) -> list[str]:
    if kind == "repeat":
        return held_out_prompts(model_dir, count=16, chars=chars)
    sources = []
    for name in HELD_OUT_FILES:
        paragraphs = [p.strip() for p in (model_dir / name).read_text().split("\n\n")]
        sources.append([p[:chars].rsplit(" ", 1)[0] for p in paragraphs if len(p) >= chars])
    count = min(len(s) for s in sources)
    return [source[i] for i in range(count) for source in sources]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


async def send(client: httpx.AsyncClient, body: dict) -> Outcome:
    start = time.perf_counter()
    try:
        response = await client.post("/v1/completions", json=body)
    except httpx.HTTPError as error:
        return Outcome(0, time.perf_counter() - start, error=repr(error))
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        return Outcome(response.status_code, seconds, error=response.text[:300])
    choice = response.json()["choices"][0]
    output = choice.get("token_ids") or choice["text"]
    tokens = response.json().get("usage", {}).get("completion_tokens", 0)
    return Outcome(200, seconds, output, tokens)


async def run_load(url: str, bodies: list[dict], clients: int, timeout: float) -> list[Outcome]:
    """Sends every body, at most `clients` at a time, and returns outcomes in body order."""
    outcomes: list[Outcome | None] = [None] * len(bodies)
    pending = iter(range(len(bodies)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def client_loop() -> None:
            for index in pending:  # a shared iterator: each index goes to one client
                outcomes[index] = await send(client, bodies[index])

        await asyncio.gather(*(client_loop() for _ in range(clients)))
    return outcomes


def model_name(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def cache_counters(url: str) -> tuple[float, float] | None:
    """`(hits, misses)` of all layers from `/metrics`, or None without expertflow metrics."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return None
    values = {}
    for line in text.splitlines():
        for name in ("hits", "misses"):
            if line.startswith(f'expertflow_{name}_total{{layer="all"}}'):
                values[name] = float(line.rsplit(" ", 1)[1])
    return (values["hits"], values["misses"]) if len(values) == 2 else None


def measure(url: str, bodies: list[dict], clients: int, timeout: float) -> tuple:
    before = cache_counters(url)
    start = time.perf_counter()
    outcomes = asyncio.run(run_load(url, bodies, clients, timeout))
    wall = time.perf_counter() - start
    time.sleep(1.5)  # engine workers write their stats snapshot at most once a second
    after = cache_counters(url)
    hit_rate = None
    if before and after:
        hits, misses = after[0] - before[0], after[1] - before[1]
        hit_rate = hits / (hits + misses) if hits + misses else None
    ok = [o for o in outcomes if o.status == 200]
    failed = [o for o in outcomes if o.status != 200]
    latencies = [o.seconds for o in ok]
    report = RunReport(
        url=url,
        requests=len(outcomes),
        errors=len(failed),
        p50_s=statistics.median(latencies) if latencies else 0.0,
        p99_s=percentile(latencies, 0.99),
        wall_s=wall,
        requests_per_s=len(ok) / wall,
        tokens_per_s=sum(o.tokens for o in ok) / wall,
        hit_rate=hit_rate,
        error_samples=[f"{o.status}: {o.error}" for o in failed[:5]],
    )
    return report, outcomes


def print_table(reports: list[RunReport], equal: int | None, total: int) -> None:
    print(f"{'url':<32} {'reqs':>5} {'errors':>6} {'p50 s':>7} {'p99 s':>7} "
          f"{'req/s':>6} {'tok/s':>7} {'hit rate':>8}")  # fmt: skip
    for r in reports:
        hit = f"{r.hit_rate:.3f}" if r.hit_rate is not None else "-"
        print(
            f"{r.url:<32} {r.requests:>5} {r.errors:>6} {r.p50_s:>7.2f} {r.p99_s:>7.2f} "
            f"{r.requests_per_s:>6.2f} {r.tokens_per_s:>7.1f} {hit:>8}"
        )
        for sample in r.error_samples:
            print(f"  error {sample}")
    if equal is not None:
        print(f"greedy outputs equal: {equal}/{total}")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    prompts = workload_prompts(args.workload, args.prompt_model)
    model = args.model or model_name(args.url)
    bodies = [
        {
            "model": model,
            "prompt": prompts[i % len(prompts)],
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        for i in range(args.requests)
    ]
    # One server at a time: both usually share this machine's cores.
    report, outcomes = measure(args.url, bodies, args.clients, args.timeout)
    reports, equal = [report], None
    if args.compare_url:
        compare, other = measure(args.compare_url, bodies, args.clients, args.timeout)
        reports.append(compare)
        equal = sum(
            a.status == b.status == 200 and a.output == b.output
            for a, b in zip(outcomes, other, strict=True)
        )
    print_table(reports, equal, len(bodies))
    result = {"workload": args.workload, "runs": [asdict(r) for r in reports], "equal": equal}
    args.json_out.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s", args.json_out)
    failed = any(r.errors for r in reports) or (equal is not None and equal != len(bodies))
    return 1 if failed else 0
