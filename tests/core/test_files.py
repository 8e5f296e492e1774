import os
import signal
import subprocess

import pytest

from vllm_expertflow.core.files import atomic_path, process_is_alive, write_text_atomically


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    write_text_atomically(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise RuntimeError("the writer died")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_folder_is_replaced_whole(tmp_path):
    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "stale.bin").write_text("stale")
    with atomic_path(out) as tmp:
        (tmp_path / tmp).mkdir()
        (tmp_path / tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_a_killed_process_is_not_alive_before_or_after_it_is_reaped():
    process = subprocess.Popen(["sleep", "30"])
    try:
        assert process_is_alive(process.pid)
        os.kill(process.pid, signal.SIGSTOP)  # a stopped process cannot act on the kill yet
        os.kill(process.pid, signal.SIGKILL)
        assert not process_is_alive(process.pid)  # a SIGKILL pending, then a zombie
    finally:
        process.kill()
        process.wait()
    assert not process_is_alive(process.pid)
