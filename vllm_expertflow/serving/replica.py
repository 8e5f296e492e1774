"""One Ray Serve replica: a private `vllm serve` engine that the ingress forwards requests to.

Running the real OpenAI server in a subprocess, rather than an engine inside the actor, means
every request gets exactly vLLM's own validation, responses and error codes. The server binds
a free 127.0.0.1 port and is started with a parent-death signal, so a replica actor that is
killed (even with SIGKILL) never leaves an orphan server behind.
"""

from __future__ import annotations

import ctypes
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..metrics import METRICS_DIR_ENV, METRICS_OWNER_ENV, SnapshotCollector

logger = logging.getLogger(__name__)

STARTUP_SECONDS = 600
PR_SET_PDEATHSIG = 1


class EngineUnreachable(Exception):
    """The engine gave no HTTP response: the request can safely go to another replica."""


@dataclass
class Forwarded:
    status: int
    body: bytes
    content_type: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def omp_binding(index: int, mode: str) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for replica `index`: one core each in turn, or `mode`."""
    if mode != "per-replica":
        return mode
    return str(index % (os.cpu_count() or 1))


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EngineProcess:
    """A `vllm serve` subprocess tied to this process's lifetime."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: str) -> None:
        self.command, self.env, self.log_path = command, env, log_path
        self.process: subprocess.Popen | None = None
        started = threading.Event()
        # The parent-death signal fires when the *thread* that forked exits, so the fork
        # happens on a thread that lives exactly as long as the server.
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=_die_with_parent,
            )
        started.set()
        self.process.wait()

    def wait_until_up(self, base: str, seconds: float = STARTUP_SECONDS) -> None:
        """Returns once `base`/health answers; raises with the log's tail if the server exits
        or is not up within `seconds` (and then stops it)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"engine exited\n{self.log_tail()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"engine not up after {seconds:.0f} s\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return Path(self.log_path).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


class EngineReplica:
    """Ray Serve deployment body (wrapped by `app`): one engine, forwarded to over HTTP."""

    def __init__(
        self, index: int, model: str, serve_args: list[str], omp_bind: str = "per-replica"
    ) -> None:
        self.index = index
        self.workdir = tempfile.mkdtemp(prefix=f"expertflow-replica{index}-")
        # Our own metrics directory: the engine's workers write their snapshots here and this
        # replica reads them (a directory chosen this way is used as given, not replaced).
        self.metrics_dir = os.path.join(self.workdir, "metrics")
        os.makedirs(self.metrics_dir)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {
            **{k: v for k, v in os.environ.items() if k != METRICS_OWNER_ENV},
            METRICS_DIR_ENV: self.metrics_dir,
            "VLLM_CPU_OMP_THREADS_BIND": omp_binding(index, omp_bind),
        }
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        command = [str(Path(sys.executable).with_name("vllm")), "serve", model, *serve_args]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.engine = EngineProcess(command, env, os.path.join(self.workdir, "server.log"))
        try:
            self.engine.wait_until_up(self.base)
        except RuntimeError as error:
            raise RuntimeError(f"replica {index}: {error}") from None
        # Generation can take long under load; only connecting is expected to be quick.
        self.client = httpx.AsyncClient(
            base_url=self.base, timeout=httpx.Timeout(None, connect=10.0)
        )
        logger.info("replica %d: engine up at %s (logs in %s)", index, self.base, self.workdir)

    async def forward(self, method: str, path: str, body: bytes | None) -> Forwarded:
        """Send one request to the engine; `EngineUnreachable` when no response came back."""
        headers = {"content-type": "application/json"} if body is not None else {}
        try:
            response = await self.client.request(method, path, content=body, headers=headers)
        except httpx.TransportError as error:  # refused, reset, or the server died mid-request
            raise EngineUnreachable(f"replica {self.index}: {error!r}") from None
        content_type = response.headers.get("content-type", "application/json")
        return Forwarded(response.status_code, response.content, content_type)

    def check_health(self) -> None:
        """Called by Ray Serve: a dead engine makes it replace this replica."""
        if self.engine.process.poll() is not None:
            raise RuntimeError(f"replica {self.index}: engine exited\n{self.engine.log_tail()}")

    def snapshots(self) -> list[dict]:
        snapshots = []
        for path in glob.glob(os.path.join(self.metrics_dir, "*.json")):
            try:
                with open(path) as f:
                    snapshots.append(json.load(f))
            except (OSError, json.JSONDecodeError):
                continue  # a worker replacing its file
        return snapshots

    def residency(self) -> dict:
        """Pool size and, when the workers report it, the resident `[layer, expert]` pairs."""
        snapshots = self.snapshots()
        resident = None
        if snapshots and all("resident" in s for s in snapshots):
            resident = [tuple(key) for s in snapshots for key in s["resident"]]
        return {"slots": sum(s.get("slots", 0) for s in snapshots), "resident": resident}

    def metrics_text(self) -> str:
        """This engine's `expertflow_*` metrics in Prometheus text format."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(SnapshotCollector(self.metrics_dir))
        return generate_latest(registry).decode()

    def __del__(self) -> None:
        # Ray Serve calls this on graceful shutdown; a killed actor relies on the death signal.
        # `engine` is missing when the constructor failed before starting it.
        if hasattr(self, "engine"):
            self.engine.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
