"""Counters and clocks of the pool's loads."""

from vllm_expertflow.core import stats
from vllm_expertflow.core.stats import SharedClock


def test_overlapping_loads_share_the_store_time(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(stats.time, "perf_counter", lambda: now[0])
    clock = SharedClock()
    a = clock.start()  # t=0: A alone until B starts
    now[0] = 1.0
    b = clock.start()  # t=1: A and B share until A ends
    now[0] = 3.0
    a_charge = clock.stop(a)
    now[0] = 4.0
    b_charge = clock.stop(b)
    assert a_charge == 1.0 + 2.0 / 2 and b_charge == 2.0 / 2 + 1.0
    assert a_charge + b_charge == 4.0  # the store was busy from 0 to 4
    # Later loads are charged from their own start: an idle store charges nobody.
    now[0] = 10.0
    c = clock.start()
    now[0] = 11.5
    assert clock.stop(c) == 1.5
