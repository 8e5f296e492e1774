"""`expertflow_*` Prometheus metrics on `vllm serve`'s `/metrics`.

The counters live in the worker processes; `/metrics` is served by the API server process.
vLLM only turns on Prometheus multiprocess mode with several API servers, and switching it on
for its own metrics from a plugin would change how every vLLM metric is stored. So ExpertFlow
keeps its own small multiprocess channel: each worker writes a JSON snapshot of its stats into
a directory the top process (the API server, or the `LLM` caller) owns, and a collector
registered there sums the snapshots at scrape time. Engine and worker processes (started by
multiprocessing) inherit the directory. A top process uses a directory a launcher chose for it
(`VLLM_EXPERTFLOW_METRICS_DIR` without an owner), and otherwise creates its own, removed at exit:
a directory inherited from an unrelated process that loaded the plugin would mix in its
engines' snapshots.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

from vllm_expertflow.core.files import process_is_alive, write_text_atomically
from vllm_expertflow.core.stats import LayerStats

logger = logging.getLogger(__name__)

METRICS_DIR_ENV = "VLLM_EXPERTFLOW_METRICS_DIR"
METRICS_OWNER_ENV = "VLLM_EXPERTFLOW_METRICS_OWNER"
SNAPSHOT_INTERVAL_SECONDS = 1.0
COUNTERS = {
    "lookups": "expert lookups by the MoE step (hits + misses)",
    "hits": "expert lookups that found the expert resident",
    "misses": "expert lookups that had to load the expert",
    "prefetches_issued": "experts loaded ahead of use by the prefetcher",
    "prefetches_used": "prefetched experts that a later lookup used",
    "prefetches_wasted": "prefetched experts evicted before any use",
    "bytes_loaded": "bytes copied from the backing store into the pool",
    "load_seconds": "seconds spent loading experts, demand and prefetch",
    "stall_seconds": "seconds the MoE step waited for expert loads",
    "step_seconds": "seconds in the MoE step (kernel, stalls, prefetcher, bookkeeping)",
    "kernel_seconds": "seconds in vLLM's kernel on the pool",
    "predict_seconds": "seconds the prefetcher spent scoring, ranking and queuing loads",
}


_registered_in_this_process = False


def setup_metrics_channel() -> None:
    """In a top process: own a snapshot directory and register the collector (once)."""
    global _registered_in_this_process
    if multiprocessing.parent_process() is not None or _registered_in_this_process:
        return  # an engine or worker process: it writes into the inherited directory
    directory = os.environ.get(METRICS_DIR_ENV)
    owner = os.environ.get(METRICS_OWNER_ENV)
    if directory is None or owner not in (None, str(os.getpid())):
        directory = tempfile.mkdtemp(prefix="expertflow-metrics-")
        os.environ[METRICS_DIR_ENV] = directory
        os.environ[METRICS_OWNER_ENV] = str(os.getpid())
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    from prometheus_client import REGISTRY

    collector = SnapshotCollector(directory)
    REGISTRY.register(collector)
    atexit.register(collector.log_unlogged_stats)  # before the directory is removed (LIFO)
    _registered_in_this_process = True


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

    def write(self, snapshot: dict, final: bool = False) -> None:
        """`final`: the worker is exiting and has logged its stats itself."""
        if self.directory is None or not os.path.isdir(self.directory):
            return
        path = os.path.join(self.directory, f"{os.getpid()}.json")
        write_text_atomically(path, json.dumps({**snapshot, "pid": os.getpid(), "final": final}))


class SnapshotCollector:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def log_unlogged_stats(self) -> None:
        """At the top process's exit: the stats of workers stopped before they could log them
        (on Ctrl-C, `vllm serve` force-kills its engine core and workers), as of their last
        snapshot (at most a second old)."""
        for snapshot in self._snapshots():
            # A live worker logs its own stats when it exits, after this process's exit hooks.
            if not snapshot.get("final") and not process_is_alive(snapshot.get("pid", 0)):
                total = LayerStats.from_row(snapshot["stats"]["total"])
                logger.info(
                    "expertflow stats: %s (worker %s, from its last snapshot)",
                    total.summary(),
                    snapshot.get("pid", "?"),
                )

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
