"""Per-layer cache counters, kept in plain Python so reading them costs nothing on the hot path."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field, fields


def running_mean(mean: float | None, sample: float, weight: float = 0.1) -> float:
    """Exponential moving average; `weight` is the newest sample's share."""
    return sample if mean is None else (1 - weight) * mean + weight * sample


class SharedClock:
    """Wall time divided among the loads in flight: while k loads run, each is charged 1/k of
    every second. What a load is charged is its share of the store's time; the charges add up
    to the time the store was busy, however the loads overlapped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._since = 0.0
        self._charged = 0.0  # per load in flight, since the clock began

    def start(self) -> float:
        """A load starts; returns the mark `stop` takes."""
        with self._lock:
            self._tick()
            self._in_flight += 1
            return self._charged

    def stop(self, mark: float) -> float:
        """The load started at `mark` ends; returns the seconds it is charged."""
        with self._lock:
            self._tick()
            self._in_flight -= 1
            return self._charged - mark

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._in_flight:
            self._charged += (now - self._since) / self._in_flight
        self._since = now


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    # The store's time its loads took: each load's wall time divided among the loads in flight
    # with it (`SharedClock`); summed over layers, the time the store was busy.
    link_seconds: float = 0.0
    stall_seconds: float = 0.0
    prefetches_issued: int = 0
    prefetches_used: int = 0
    prefetches_wasted: int = 0
    # Pools that keep records as stored (packed int4) decode each kernel call's experts.
    experts_decoded: int = 0
    decode_seconds: float = 0.0
    # Where the host step's wall time goes (CPU clocks: on CUDA the kernel's is its launch).
    step_seconds: float = 0.0  # all of `HostStep.run`
    kernel_seconds: float = 0.0
    predict_seconds: float = 0.0  # the prefetcher: scores, ranking, queuing the loads

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @classmethod
    def from_row(cls, row: dict) -> LayerStats:
        """From a row of `OffloadStats.as_dict` (derived keys are ignored)."""
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    def summary(self) -> str:
        return (
            f"lookups={self.lookups} hits={self.hits} misses={self.misses} "
            f"hit_rate={self.hit_rate:.3f} loaded={self.bytes_loaded / 2**20:.1f} MiB "
            f"load_seconds={self.load_seconds:.3f} stall_seconds={self.stall_seconds:.3f} "
            f"prefetches issued/used/wasted={self.prefetches_issued}/{self.prefetches_used}/"
            f"{self.prefetches_wasted} step_seconds={self.step_seconds:.3f} "
            f"kernel_seconds={self.kernel_seconds:.3f} predict_seconds={self.predict_seconds:.3f}"
            + (
                f" decoded={self.experts_decoded} decode_seconds={self.decode_seconds:.3f}"
                if self.experts_decoded
                else ""
            )
        )


@dataclass
class OffloadStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    # Loads finish on I/O threads while the step thread counts lookups.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def layer(self, layer: int) -> LayerStats:
        if layer not in self.layers:
            self.layers[layer] = LayerStats()
        return self.layers[layer]

    def record_lookups(self, layer: int, hits: int, misses: int) -> None:
        stats = self.layer(layer)
        stats.hits += hits
        stats.misses += misses

    def record_load(self, layer: int, num_bytes: int, seconds: float, link_seconds: float) -> None:
        with self._lock:
            stats = self.layer(layer)
            stats.loads += 1
            stats.bytes_loaded += num_bytes
            stats.load_seconds += seconds
            stats.link_seconds += link_seconds

    def record_stall(self, layer: int, seconds: float) -> None:
        self.layer(layer).stall_seconds += seconds

    def record_decode(self, layer: int, experts: int, seconds: float) -> None:
        stats = self.layer(layer)
        stats.experts_decoded += experts
        stats.decode_seconds += seconds

    def record_step(self, layer: int, seconds: float, kernel_seconds: float) -> None:
        stats = self.layer(layer)
        stats.step_seconds += seconds
        stats.kernel_seconds += kernel_seconds

    def record_predict(self, layer: int, seconds: float) -> None:
        self.layer(layer).predict_seconds += seconds

    def record_prefetch(self, layer: int) -> None:
        self.layer(layer).prefetches_issued += 1

    def record_used_prefetch(self, layer: int) -> None:
        self.layer(layer).prefetches_used += 1

    def record_wasted_prefetch(self, layer: int) -> None:
        self.layer(layer).prefetches_wasted += 1

    def total(self) -> LayerStats:
        total = LayerStats()
        with self._lock:
            for stats in self.layers.values():
                for f in fields(LayerStats):
                    setattr(total, f.name, getattr(total, f.name) + getattr(stats, f.name))
        return total

    def as_dict(self) -> dict:
        def row(stats: LayerStats) -> dict:
            return {**asdict(stats), "lookups": stats.lookups, "hit_rate": stats.hit_rate}

        return {
            "total": row(self.total()),
            "layers": {str(layer): row(s) for layer, s in sorted(self.layers.items())},
        }

    def summary(self) -> str:
        return self.total().summary()
