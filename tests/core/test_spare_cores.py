"""Loading threads leave the compute core: a process pinned as vLLM's CPU worker pins itself
moves its pool threads to the cores its parent may use and it may not."""

import os
import subprocess
import sys

import pytest

CHILD = """
import os, threading
from vllm_expertflow.core.spare_cores import move_to_spare_cores, spare_cores
os.sched_setaffinity(0, {0})  # as vLLM pins its worker to its compute cores
placed = {}
def run():
    move_to_spare_cores()
    placed["thread"] = sorted(os.sched_getaffinity(0))
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(sorted(spare_cores()), placed["thread"], sorted(os.sched_getaffinity(0)))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_pinned_process_moves_its_pool_threads_to_the_cores_it_was_not_pinned_to():
    ours = sorted(os.sched_getaffinity(0))
    if ours[0] != 0:
        pytest.skip("this process may not run on core 0")
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True
    ).stdout
    spare = ours[1:]
    # The thread moved to the spare cores; the process (its compute) stayed where it was pinned.
    assert out.split("\n")[0] == f"{spare} {spare} [0]"


def test_an_unpinned_process_leaves_its_threads_where_they_are():
    out = subprocess.run(
        [sys.executable, "-c", CHILD.replace("os.sched_setaffinity(0, {0})", "")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ours = sorted(os.sched_getaffinity(0))
    assert out.split("\n")[0] == f"[] {ours} {ours}"
