"""Start-up errors only a worker can find, carried to the process that started the engine.

vLLM ends a failed start in the caller with "Engine core initialization failed. See root cause
above.", the worker's own message a hundred log lines up. A worker whose model load fails with
an `expertflow:` error (a store write that fails: a disk that filled after the caller's check,
a folder where a layer file belongs) writes that line into the directory the top process owns
for its workers (metrics.py); the caller's wait for its engine (patches/startup_errors.py)
raises it as the error of the start.
"""

from __future__ import annotations

import os

from vllm_expertflow.core.config import ExpertFlowConfigError
from vllm_expertflow.core.files import write_text_atomically
from vllm_expertflow.metrics import METRICS_DIR_ENV

_PREFIX = "startup-error-"


def report(error: ExpertFlowConfigError) -> None:
    """In a worker: leave the error's line for the top process (no-op without its directory)."""
    directory = os.environ.get(METRICS_DIR_ENV)
    if directory is not None and os.path.isdir(directory):
        write_text_atomically(os.path.join(directory, f"{_PREFIX}{os.getpid()}.txt"), str(error))


def take_reported(since: float) -> list[str]:
    """In the top process: the lines reported since `since` (a `time.time()`), oldest first.

    Their files are removed, so a later start in the same process sees only its own."""
    directory = os.environ.get(METRICS_DIR_ENV)
    if directory is None or not os.path.isdir(directory):
        return []
    reports = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not name.startswith(_PREFIX):
            continue
        try:
            written = os.stat(path).st_mtime
            with open(path) as f:
                line = f.read().strip()
            os.unlink(path)
        except OSError:
            continue
        if written >= since and line:
            reports.append((written, line))
    return [line for _, line in sorted(reports)]
