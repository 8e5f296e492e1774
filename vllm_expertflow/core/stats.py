"""Per-layer cache counters, kept in plain Python so reading them costs nothing on the hot path."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


@dataclass
class OffloadStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def layer(self, layer: int) -> LayerStats:
        if layer not in self.layers:
            self.layers[layer] = LayerStats()
        return self.layers[layer]

    def record_lookups(self, layer: int, hits: int, misses: int) -> None:
        stats = self.layer(layer)
        stats.hits += hits
        stats.misses += misses

    def record_load(self, layer: int, num_bytes: int, seconds: float) -> None:
        stats = self.layer(layer)
        stats.bytes_loaded += num_bytes
        stats.load_seconds += seconds

    def total(self) -> LayerStats:
        total = LayerStats()
        for stats in self.layers.values():
            total.hits += stats.hits
            total.misses += stats.misses
            total.bytes_loaded += stats.bytes_loaded
            total.load_seconds += stats.load_seconds
        return total

    def as_dict(self) -> dict:
        def row(stats: LayerStats) -> dict:
            return {**asdict(stats), "lookups": stats.lookups, "hit_rate": stats.hit_rate}

        return {
            "total": row(self.total()),
            "layers": {str(layer): row(s) for layer, s in sorted(self.layers.items())},
        }

    def summary(self) -> str:
        total = self.total()
        return (
            f"lookups={total.lookups} hits={total.hits} misses={total.misses} "
            f"hit_rate={total.hit_rate:.3f} loaded={total.bytes_loaded / 2**20:.1f} MiB "
            f"load_seconds={total.load_seconds:.3f}"
        )
