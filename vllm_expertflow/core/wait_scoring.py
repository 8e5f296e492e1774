"""`PredictivePolicy`'s scoring, compiled with numba: a choice scores every resident slot.

Imported on first use, never with `policy`: vLLM 0.32's worker scans every loaded module's
globals when it starts (`register_triton_kernel_overrides`) and fails on llvmlite's library
wrappers, so loading numba before a worker has started would stop vLLM from starting.
"""

from __future__ import annotations

import numba
import numpy as np

from .policy import DECAY_PER_TURN


@numba.njit(cache=True)
def expected_wait(decayed: float, share: float, distance: float, num_layers: int) -> float:
    """`PredictivePolicy`'s expected wait, from an expert's decayed use count, its predicted
    share (NaN: none) and the turns until its layer runs next."""
    p = max(min(1.0, decayed * DECAY_PER_TURN), 1e-3)  # never used lately is not never again
    s = p if np.isnan(share) else share
    return distance + (1.0 - s) * num_layers / p


@numba.njit(cache=True)
def longest_waits(
    scored, counts, lasts, layer_of, shares, stamps, turn_of, distance_of, decay, num_layers, out
):
    """Fills `out` with the scored slots of the longest expected waits, longest first, the
    least stamped of equals first (-1 past the last); returns -1, or the oldest age in turns
    if `decay` does not reach it."""
    waits = np.full(len(out), -np.inf)
    out[:] = -1
    oldest = -1
    for slot in range(len(scored)):
        if not scored[slot]:
            continue
        layer = layer_of[slot]
        age = turn_of[layer] - lasts[slot]
        if age >= len(decay):
            oldest = max(oldest, age)
            continue
        wait = expected_wait(
            counts[slot] * decay[age], shares[slot], distance_of[layer], num_layers
        )
        place = len(out)  # insertion into the short ranking, from its end
        while place > 0 and (
            wait > waits[place - 1]
            or (
                wait == waits[place - 1]
                and out[place - 1] >= 0
                and stamps[slot] < stamps[out[place - 1]]
            )
        ):
            place -= 1
        if place < len(out):
            waits[place + 1 :] = waits[place:-1].copy()
            out[place + 1 :] = out[place:-1].copy()
            waits[place], out[place] = wait, slot
    return oldest
