"""The snapshot channel behind `expertflow_*` metrics (no engine needed)."""

import json
import logging
import os
import subprocess

from prometheus_client import CollectorRegistry, generate_latest

from vllm_expertflow.core.stats import OffloadStats
from vllm_expertflow.metrics import SnapshotCollector, SnapshotWriter


def test_collector_sums_worker_snapshots_per_layer(tmp_path, monkeypatch):
    for pid, hits in ((101, 3), (102, 4)):
        stats = OffloadStats()
        stats.record_lookups(0, hits, 1)
        stats.record_lookups(1, 1, 0)
        monkeypatch.setattr("os.getpid", lambda pid=pid: pid)
        writer = SnapshotWriter()
        writer.directory = str(tmp_path)
        writer.write({"stats": stats.as_dict(), "resident_slots": 5, "slots": 8})
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(str(tmp_path)))
    text = generate_latest(registry).decode()
    assert 'expertflow_hits_total{layer="0"} 7.0' in text
    assert 'expertflow_hits_total{layer="all"} 9.0' in text
    assert 'expertflow_misses_total{layer="all"} 2.0' in text
    assert 'expertflow_lookups_total{layer="all"} 11.0' in text
    assert "expertflow_slots 16.0" in text


class Records(logging.Handler):
    """The records of one logger, each once (caplog also sees what vLLM's handlers see)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_workers_gone_without_logging_their_stats_are_logged_at_exit(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process
    writer = SnapshotWriter()
    writer.directory = str(tmp_path)
    # (pid, final): logged its own stats; stopped before it could; alive, will log its own.
    for pid, final in ((gone.pid, True), (gone.pid, False), (os.getpid(), False)):
        stats = OffloadStats()
        stats.record_lookups(0, 200 + final, 1)
        snapshot = {"stats": stats.as_dict(), "resident_slots": 1, "slots": 2}
        writer.write(snapshot, final=final)
        written = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
        (tmp_path / f"{pid}-{final}.json").write_text(json.dumps({**written, "pid": pid}))
    (tmp_path / f"{os.getpid()}.json").unlink()
    logger, records = logging.getLogger("vllm_expertflow.metrics"), Records()
    logger.addHandler(records)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        SnapshotCollector(str(tmp_path)).log_unlogged_stats()
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert records.messages == [
        "expertflow stats: lookups=201 hits=200 misses=1 hit_rate=0.995 loaded=0.0 MiB "
        "load_seconds=0.000 stall_seconds=0.000 prefetches issued/used/wasted=0/0/0 "
        "step_seconds=0.000 kernel_seconds=0.000 predict_seconds=0.000 "
        f"(worker {gone.pid}, from its last snapshot)"
    ]
