"""The Ray Serve application: N engine replicas behind one OpenAI-compatible ingress.

Each replica is its own single-replica deployment (`replica-0`, `replica-1`, ...), not one
deployment with N replicas: Serve's handle picks among a deployment's replicas by itself, and
expert-affinity routing has to choose a specific engine. Serve still restarts a replica whose
actor dies, and the ingress routes around it meanwhile.

Engines and Ray actors ask for no Ray CPUs: the engines pin their OpenMP threads themselves
(`VLLM_CPU_OMP_THREADS_BIND`), and Ray's CPU accounting would only refuse to place N engines on
a small machine.
"""

from __future__ import annotations

import logging
import os

import ray
from ray import serve
from ray.serve import Application

from .ingress import Ingress
from .replica import EngineReplica

logger = logging.getLogger(__name__)

APP_NAME = "expertflow"
# vLLM queues and batches itself; Serve's default of 5 ongoing requests would queue in front.
MAX_ONGOING_REQUESTS = 1024


def build_app(
    model: str,
    replicas: int,
    serve_args: list[str],
    routing: str = "round-robin",
    omp_bind: str = "per-replica",
    load_penalty: float = 0.25,
) -> Application:
    """`serve_args` are `vllm serve` options; `--moe-backend expertflow` is added if absent."""
    if "--moe-backend" not in serve_args:
        serve_args = ["--moe-backend", "expertflow", *serve_args]
    replica = serve.deployment(
        EngineReplica,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=MAX_ONGOING_REQUESTS,
        health_check_period_s=5,
        graceful_shutdown_timeout_s=30,
    )
    handles = [
        replica.options(name=f"replica-{i}").bind(i, model, serve_args, omp_bind)
        for i in range(replicas)
    ]
    ingress = serve.deployment(
        Ingress,
        name="ingress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=MAX_ONGOING_REQUESTS,
    )
    return ingress.bind(handles, model, routing, load_penalty)


def start(app: Application, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Start Ray (local) and Serve, deploy `app`, and return its base URL once it is up."""
    ray.init(
        include_dashboard=False,
        # Requests and responses are small; Ray's default store is a share of all memory.
        object_store_memory=256 * 1024**2,
        ignore_reinit_error=True,
        log_to_driver=os.environ.get("EXPERTFLOW_RAY_LOGS") == "1",
    )
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    logger.info("expertflow serving at %s", url)
    return url


def stop() -> None:
    serve.shutdown()
    ray.shutdown()
