"""An emulated link between the store and the pool, for benchmarks only.

On the tiny demo model a load is cheap next to vLLM's per-forward overhead, unlike a real
deployment (a 9 MB expert over PCIe, a 350 MB one over NVMe). Limiting the bytes per second
that loads may move reproduces a target deployment's load-to-compute ratio. All loads share one
link, as they share one PCIe lane or one disk: each waits for the transfers queued before it.
"""

from __future__ import annotations

import threading
import time


class EmulatedLink:
    def __init__(self, gbps: float) -> None:
        if gbps <= 0:
            raise ValueError(f"link bandwidth must be positive, got {gbps} GB/s")
        self.bytes_per_second = gbps * 1e9
        self._free_at = 0.0
        self._lock = threading.Lock()

    def transfer(self, num_bytes: int) -> None:
        """Blocks until `num_bytes` have crossed the link after everything queued before."""
        with self._lock:
            start = max(time.perf_counter(), self._free_at)
            self._free_at = start + num_bytes / self.bytes_per_second
            done_at = self._free_at
        delay = done_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
