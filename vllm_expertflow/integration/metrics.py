"""`expertflow_*` Prometheus metrics on `vllm serve`'s `/metrics`.

The counters live in the worker processes; `/metrics` is served by the API server process.
vLLM only turns on Prometheus multiprocess mode with several API servers, and switching it on
for its own metrics from a plugin would change how every vLLM metric is stored. So ExpertFlow
keeps its own small multiprocess channel: each worker writes a JSON snapshot of its stats into
a directory the first process (the API server, or the `LLM` caller) creates, and a collector
registered there sums the snapshots at scrape time. The directory is removed by the process
that created it, at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

METRICS_DIR_ENV = "VLLM_EXPERTFLOW_METRICS_DIR"
SNAPSHOT_INTERVAL_SECONDS = 1.0
COUNTERS = {
    "hits": "expert lookups that found the expert resident",
    "misses": "expert lookups that had to load the expert",
    "prefetches_issued": "experts loaded ahead of use by the prefetcher",
    "prefetches_used": "prefetched experts that a later lookup used",
    "prefetches_wasted": "prefetched experts evicted before any use",
    "bytes_loaded": "bytes copied from the backing store into the pool",
    "load_seconds": "seconds spent loading experts, demand and prefetch",
    "stall_seconds": "seconds the MoE step waited for expert loads",
}


def setup_metrics_channel() -> None:
    """In the first vLLM process: create the snapshot directory and register the collector."""
    if os.environ.get(METRICS_DIR_ENV):
        return  # a child process: the creator serves the metrics
    directory = tempfile.mkdtemp(prefix="expertflow-metrics-")
    os.environ[METRICS_DIR_ENV] = directory
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    from prometheus_client import REGISTRY

    REGISTRY.register(SnapshotCollector(directory))


class SnapshotWriter:
    """Writes a worker's stats for the collector, at most once per interval."""

    def __init__(self) -> None:
        self.directory = os.environ.get(METRICS_DIR_ENV)
        self._last_write = 0.0

    def maybe_write(self, snapshot_fn) -> None:
        now = time.monotonic()
        if self.directory is None or now - self._last_write < SNAPSHOT_INTERVAL_SECONDS:
            return
        self._last_write = now
        self.write(snapshot_fn())

    def write(self, snapshot: dict) -> None:
        if self.directory is None or not os.path.isdir(self.directory):
            return
        path = os.path.join(self.directory, f"{os.getpid()}.json")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(snapshot, f)
        os.replace(tmp, path)


class SnapshotCollector:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _snapshots(self) -> list[dict]:
        snapshots = []
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(self.directory, name)) as f:
                        snapshots.append(json.load(f))
                except (OSError, json.JSONDecodeError):
                    continue  # a worker that exited mid-scrape
        return snapshots

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snapshots = self._snapshots()
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(f"expertflow_{name}", help_text, labels=["layer"])
            totals: dict[str, float] = {}
            for snapshot in snapshots:
                for layer, row in snapshot["stats"]["layers"].items():
                    totals[layer] = totals.get(layer, 0) + row[name]
            for layer, value in sorted(totals.items(), key=lambda kv: int(kv[0])):
                family.add_metric([layer], value)
            family.add_metric(["all"], sum(totals.values()))
            yield family
        for name, help_text in (
            ("resident_slots", "expert slots holding an expert"),
            ("slots", "expert slots in the pool"),
        ):
            gauge = GaugeMetricFamily(f"expertflow_{name}", help_text)
            gauge.add_metric([], sum(s[name] for s in snapshots))
            yield gauge
