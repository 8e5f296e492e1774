import time

import pytest

from vllm_expertflow.core.link import EmulatedLink


def test_transfers_queue_behind_each_other():
    link = EmulatedLink(gbps=0.001)  # 1 MB/s
    start = time.perf_counter()
    link.transfer(20_000)
    link.transfer(20_000)
    # Two 20 kB transfers over a 1 MB/s link cannot finish before 40 ms.
    assert time.perf_counter() - start >= 0.04


def test_bandwidth_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        EmulatedLink(0)
