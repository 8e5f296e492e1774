"""The HTTP front: one OpenAI-compatible endpoint that spreads requests over the replicas.

`/v1/completions` and `/v1/chat/completions` go to the replica the routing policy picks;
`/health`, `/metrics` are answered here; anything else (`/v1/models`, `/tokenize`, ...) goes to
any healthy replica. Responses, error responses included, are vLLM's own, byte for byte.

What is retried. A request is sent again, to another replica where one is healthy, when it
got no HTTP response at all: the replica actor died or was unreachable before or while
handling it (`RayActorError`, Serve's `ReplicaUnavailableError`/`BackPressureError`), or the
replica's engine refused or dropped the connection (`EngineUnreachable`). Completions have no
side effects, so resending one that the dead replica had partly generated is safe. A request
that got any HTTP response, a 4xx or 5xx included, is never retried: the response goes back to
the client as it is. Retries stop after `RETRY_SECONDS`, and the client gets a 503.

A background task asks every replica for its residency each second; a replica that does not
answer within `PROBE_TIMEOUT_SECONDS` (dead, or being restarted by Ray Serve) is left out of
routing until it answers again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter

import torch
from fastapi import FastAPI, Request, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from .exposition import sum_metrics
from .prediction import PromptExpertPredictor, prompt_text
from .replica import EngineUnreachable, Forwarded
from .routing import Demand, ExpertAffinity, ReplicaView, RoutingHistory, make_policy

logger = logging.getLogger(__name__)

RETRY_SECONDS = 300.0
PROBE_INTERVAL_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 5.0
RETRYABLE = (EngineUnreachable, RayActorError, ReplicaUnavailableError, BackPressureError)

fastapi_app = FastAPI()


async def _call(response, timeout: float):
    async def wait():
        return await response

    return await asyncio.wait_for(wait(), timeout)


@serve.ingress(fastapi_app)
class Ingress:
    """Ray Serve deployment body (wrapped by `app`), given the replicas' handles."""

    def __init__(
        self,
        replicas: list[DeploymentHandle],
        model: str,
        routing: str = "round-robin",
        load_penalty: float = 0.25,
    ) -> None:
        # The cores belong to the engines; the prediction is a few small matrix products.
        torch.set_num_threads(1)
        self.replicas = replicas
        self.policy = make_policy(routing)
        if isinstance(self.policy, ExpertAffinity):
            self.policy.load_penalty = load_penalty
        self.predictor = PromptExpertPredictor(model) if routing == "expert-affinity" else None
        self.history = RoutingHistory()
        count = len(replicas)
        # Serve may route to the ingress before the replicas are up: the probes decide.
        self.healthy = [False] * count
        self.in_flight = [0] * count
        self.slots = [0] * count
        self.reported: list[frozenset | None] = [None] * count
        self.requests: Counter[int] = Counter()
        self.retries = 0
        self._monitor: asyncio.Task | None = None

    # -- replica state -------------------------------------------------------------------
    def _ensure_monitor(self) -> None:
        # Started on first use: the constructor does not run inside the serving event loop.
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._watch_replicas())

    async def _watch_replicas(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(i) for i in range(len(self.replicas))))
            await asyncio.sleep(PROBE_INTERVAL_SECONDS)

    async def _probe(self, index: int) -> None:
        try:
            residency = await _call(self.replicas[index].residency.remote(), PROBE_TIMEOUT_SECONDS)
        except Exception as error:  # any failure means: do not route there for now
            if self.healthy[index]:
                logger.warning("replica %d left out of routing: %r", index, error)
            self.healthy[index] = False
            return
        if not self.healthy[index]:
            logger.info("replica %d back in routing", index)
        self.healthy[index] = True
        self.slots[index] = residency["slots"]
        resident = residency["resident"]
        self.reported[index] = None if resident is None else frozenset(map(tuple, resident))

    def _view(self, index: int) -> ReplicaView:
        resident = self.reported[index]
        if resident is None:
            resident = self.history.resident(index, self.slots[index] or None)
        return ReplicaView(index, self.in_flight[index], resident)

    def _pick(self, demand: Demand | None, exclude: set[int]) -> int:
        everyone = range(len(self.replicas))
        candidates = [i for i in everyone if self.healthy[i] and i not in exclude]
        # Nothing healthy left: the handle queues the request until Serve restarts a replica.
        candidates = candidates or [i for i in everyone if self.healthy[i]] or list(everyone)
        return self.policy.choose([self._view(i) for i in candidates], demand)

    # -- forwarding ----------------------------------------------------------------------
    async def dispatch(
        self, method: str, path: str, body: bytes | None, demand: Demand | None = None
    ) -> Response:
        self._ensure_monitor()
        failed: set[int] = set()
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            index = self._pick(demand, failed)
            if demand:
                self.history.record(index, demand)
            self.in_flight[index] += 1
            self.requests[index] += 1
            try:
                forwarded: Forwarded = await self.replicas[index].forward.remote(method, path, body)
                return Response(forwarded.body, forwarded.status, media_type=forwarded.content_type)
            except RETRYABLE as error:
                self.healthy[index] = False
                failed.add(index)
                if time.monotonic() > deadline:
                    return _error(503, f"no replica could serve the request: {error!r}")
                self.retries += 1
                logger.warning("retrying %s after replica %d failed: %r", path, index, error)
                await asyncio.sleep(0.2)
            finally:
                self.in_flight[index] -= 1

    # -- routes (registered in this order; the catch-all comes last) ----------------------
    @fastapi_app.post("/v1/completions")
    @fastapi_app.post("/v1/chat/completions")
    async def routed(self, request: Request) -> Response:
        body = await request.body()
        demand = None
        if self.predictor is not None:
            try:
                demand = self.predictor.predict(prompt_text(json.loads(body)))
            except (ValueError, AttributeError, TypeError):
                pass  # not a JSON object: vLLM answers with its own error
        return await self.dispatch("POST", request.url.path, body, demand)

    @fastapi_app.get("/health")
    async def health(self) -> Response:
        self._ensure_monitor()
        return Response(status_code=200 if any(self.healthy) else 503)

    @fastapi_app.get("/metrics")
    async def metrics(self) -> Response:
        self._ensure_monitor()
        healthy = [i for i, up in enumerate(self.healthy) if up]
        texts = await asyncio.gather(
            *(
                _call(self.replicas[i].metrics_text.remote(), PROBE_TIMEOUT_SECONDS)
                for i in healthy
            ),
            return_exceptions=True,
        )
        summed = sum_metrics([t for t in texts if isinstance(t, str)])
        return Response(summed + self._own_metrics(), media_type="text/plain; version=0.0.4")

    def _own_metrics(self) -> str:
        lines = [
            "# HELP expertflow_serve_requests_total requests dispatched to each replica",
            "# TYPE expertflow_serve_requests_total counter",
            *(
                f'expertflow_serve_requests_total{{replica="{i}"}} {self.requests[i]}'
                for i in range(len(self.replicas))
            ),
            "# HELP expertflow_serve_retries_total requests resent after a replica failed",
            "# TYPE expertflow_serve_retries_total counter",
            f"expertflow_serve_retries_total {self.retries}",
            "# HELP expertflow_serve_replica_up whether the replica is in routing",
            "# TYPE expertflow_serve_replica_up gauge",
            *(
                f'expertflow_serve_replica_up{{replica="{i}"}} {int(up)}'
                for i, up in enumerate(self.healthy)
            ),
        ]
        return "\n".join(lines) + "\n"

    @fastapi_app.api_route("/{path:path}", methods=["GET", "POST"])
    async def passthrough(self, request: Request) -> Response:
        body = await request.body() if request.method == "POST" else None
        return await self.dispatch(request.method, request.url.path, body)


def _error(status: int, message: str) -> Response:
    body = {"error": {"message": message, "type": "ServiceUnavailable", "code": status}}
    return Response(json.dumps(body), status, media_type="application/json")
