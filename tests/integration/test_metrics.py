"""The snapshot channel behind `expertflow_*` metrics (no engine needed)."""

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
    assert "expertflow_slots 16.0" in text
