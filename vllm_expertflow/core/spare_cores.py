"""The CPU cores the compute threads leave free, for the pool's loading and decoding threads.

vLLM's CPU worker pins its process, and so every thread it starts, to the cores its OpenMP
compute threads run on; it reserves the other cores for the engine's own processes, which
wait while a forward runs. A load or decode thread started in the worker would share the
compute core and slow the forward instead of overlapping it, so these threads move to the
cores the parent process may use and this process does not.
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(__name__)


@functools.cache
def spare_cores() -> frozenset[int]:
    """Cores the parent process may run on and this process is not pinned to (may be empty)."""
    try:
        ours = os.sched_getaffinity(0)
        allowed = os.sched_getaffinity(os.getppid())
    except (AttributeError, OSError):  # no affinity API (not Linux), or no parent to ask
        return frozenset()
    return frozenset(allowed - ours)


def move_to_spare_cores() -> None:
    """A thread initializer: runs the calling thread on the spare cores, if there are any."""
    cores = spare_cores()
    if not cores:
        return
    try:
        os.sched_setaffinity(0, cores)  # on Linux, 0 is the calling thread
    except OSError as error:
        logger.debug("expertflow: could not move a thread to cores %s: %s", sorted(cores), error)
