"""Eviction speed at a real model's pool size: wall microseconds per evicting allocation.

    .venv/bin/python benchmarks/eviction_speed.py

A `PageTable` of 1,536 slots (Qwen3-30B-A3B at 25%: 48 MoE layers x 128 experts) fed 200
tokens of skewed random top-8 routing, batch 1: each layer pins its experts, allocating the
misses, then releases them. Only allocations made once the pool is full (each evicts) are
timed. One thread.
"""

from __future__ import annotations

import statistics
import time

import torch

from vllm_expertflow.core.page_table import PageTable
from vllm_expertflow.core.policy import make_policy

LAYERS, EXPERTS, TOP_K, TOKENS, SLOTS = 48, 128, 8, 200, 1536


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    popularity = torch.rand(EXPERTS, generator=gen) ** 3 + 0.02
    routing = [
        torch.multinomial(popularity.expand(TOKENS, EXPERTS), TOP_K, generator=gen).tolist()
        for _ in range(LAYERS)
    ]
    for name in ("lru", "predictive"):
        table = PageTable(SLOTS, make_policy(name, SLOTS, LAYERS))
        allocations = 0
        timed = []
        for token in range(TOKENS):
            for layer in range(LAYERS):
                pinned = []
                for expert in routing[layer][token]:
                    slot = table.lookup((layer, expert))
                    if slot is None:
                        start = time.perf_counter()
                        slot, _ = table.allocate((layer, expert))
                        if allocations >= SLOTS:
                            timed.append(time.perf_counter() - start)
                        allocations += 1
                    else:
                        table.touch(slot)
                    table.pin(slot)
                    pinned.append(slot)
                for slot in pinned:
                    table.unpin(slot)
        print(
            f"{name}: {len(timed)} evicting allocations, "
            f"median {1e6 * statistics.median(timed):.1f} us, "
            f"mean {1e6 * statistics.fmean(timed):.1f} us"
        )


if __name__ == "__main__":
    main()
