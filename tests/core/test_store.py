import json
import os

import pytest
import torch

from vllm_expertflow.core.disk_store import MANIFEST, DiskStore, StoreCorruptedError
from vllm_expertflow.core.store import RamStore

NUM_EXPERTS = 5
FINGERPRINT = {"model": "tiny", "dtype": "bfloat16"}


def random_layer(seed: int) -> dict[str, torch.Tensor]:
    """A quantized-looking record: parts of different dtypes and shapes, as int4 stores have."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "w13_packed": torch.randint(
            -(2**31), 2**31 - 1, (NUM_EXPERTS, 64, 4), dtype=torch.int32, generator=generator
        ),
        "w13_scale": torch.randn(NUM_EXPERTS, 64, 1, generator=generator).to(torch.bfloat16),
        "w2": torch.randn(NUM_EXPERTS, 32, 32, generator=generator).to(torch.bfloat16),
    }


def write_store(store, layers=(0, 1)):
    for layer in layers:
        store.write_layer(layer, random_layer(layer))
    store.finish_writing()


def assert_round_trip_bit_exact(store, layers=(0, 1)):
    for layer in layers:
        expected = random_layer(layer)
        for expert in range(NUM_EXPERTS):
            record = store.read_expert(layer, expert)
            assert list(record) == list(expected)
            for name, tensor in expected.items():
                assert record[name].dtype == tensor.dtype
                assert torch.equal(record[name].view(torch.uint8), tensor[expert].view(torch.uint8))


def test_ram_store_round_trip_is_bit_exact():
    store = RamStore(NUM_EXPERTS, pin_memory=False)
    write_store(store)
    assert_round_trip_bit_exact(store)


def test_disk_store_round_trip_is_bit_exact_and_bypasses_the_page_cache(tmp_path):
    store = DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    write_store(store)
    assert_round_trip_bit_exact(store)
    assert store.bypass in ("O_DIRECT", "fadvise")
    assert sorted(os.listdir(tmp_path)) == ["layer_0.bin", "layer_1.bin", MANIFEST]


def test_disk_store_is_reused_without_rewriting(tmp_path):
    write_store(DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS))
    mtime = os.stat(tmp_path / "layer_0.bin").st_mtime_ns
    reopened = DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    assert reopened.has_layer(0) and reopened.has_layer(1)
    reopened.finish_writing()
    assert_round_trip_bit_exact(reopened)
    assert os.stat(tmp_path / "layer_0.bin").st_mtime_ns == mtime


def test_manifest_for_another_model_is_not_used(tmp_path):
    write_store(DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS))
    other = DiskStore(str(tmp_path), {**FINGERPRINT, "model": "other"}, NUM_EXPERTS)
    assert not other.has_layer(0)


def test_corrupt_layer_file_is_detected_and_rebuilt(tmp_path):
    write_store(DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS))
    with open(tmp_path / "layer_1.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    store = DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    assert store.has_layer(0)
    assert not store.has_layer(1)
    store.write_layer(1, random_layer(1))
    store.finish_writing()
    assert_round_trip_bit_exact(store)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert set(manifest["layers"]) == {"0", "1"}


def test_a_record_damaged_after_start_up_is_never_returned(tmp_path, caplog):
    store = DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    write_store(store)
    with open(tmp_path / "layer_1.bin", "r+b") as f:  # in place, under the open store
        f.seek(3 * store.record_stride + 128)
        f.write(b"\x00" * 128)
    with pytest.raises(StoreCorruptedError, match="expert 3 of layer 1 .* does not match its"):
        store.read_expert(1, 3)
    assert "expert 3 of layer 1" in caplog.text
    assert_round_trip_bit_exact(store, layers=(0,))  # the other records still read
    assert not DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS).has_layer(1)  # next start


def test_a_read_that_fails_its_checksum_once_is_read_again(tmp_path, monkeypatch):
    store = DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    write_store(store)
    read_record, reads = store._read_record, []

    def flaky(layer, expert, buffer):  # the first read of each record returns garbage
        read_record(layer, expert, buffer)
        reads.append((layer, expert))
        if reads.count((layer, expert)) == 1:
            buffer[:8] = b"\xff" * 8

    monkeypatch.setattr(store, "_read_record", flaky)
    assert_round_trip_bit_exact(store)
    assert len(reads) == 2 * 2 * NUM_EXPERTS


def test_unfinished_write_leaves_no_usable_store(tmp_path):
    store = DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    store.write_layer(0, random_layer(0))  # the process dies before finish_writing
    assert not os.path.exists(tmp_path / MANIFEST)
    assert not DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS).has_layer(0)


def test_mismatched_layout_is_refused():
    store = RamStore(NUM_EXPERTS, pin_memory=False)
    store.write_layer(0, random_layer(0))
    other = random_layer(1)
    other["w2"] = other["w2"][:, :16]
    with pytest.raises(ValueError, match="expert layout"):
        store.write_layer(1, other)


@pytest.mark.parametrize(
    "damage",
    [
        "[]",
        '{"format": 2, "layers": [1, 2]}',
        "null",
        "\xff\xfe not text",
    ],
)
def test_a_damaged_manifest_is_rebuilt_not_a_crash(tmp_path, damage):
    write_store(DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS))
    (tmp_path / MANIFEST).write_bytes(damage.encode("latin-1"))
    store = DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    assert not store.has_layer(0)
    write_store(store)
    assert_round_trip_bit_exact(store)


def test_a_manifest_with_a_damaged_layout_is_rebuilt(tmp_path):
    write_store(DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["layout"] = [{"name": "w2", "shape": [32, 32], "dtype": "no_such_dtype"}]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    store = DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    assert store.layout is None and not store.has_layer(0)


def test_leftovers_of_a_dead_writer_are_removed_and_a_live_writers_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()
    (tmp_path / f"layer_0.bin.{dead}.tmp").write_bytes(b"x" * 4096)
    (tmp_path / f".manifest.json.{dead}.tmp").write_text("{")
    live = tmp_path / f"layer_1.bin.{os.getpid()}.tmp"
    live.write_bytes(b"y")
    DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    assert sorted(os.listdir(tmp_path)) == [live.name]


def test_a_layer_that_does_not_fit_is_refused_with_the_bytes(tmp_path, monkeypatch):
    import shutil

    from vllm_expertflow.core.config import ExpertFlowConfigError

    store = DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    refusal = r"needs \d+ bytes more for layer 0 .* but 1000 bytes are free"
    with pytest.raises(ExpertFlowConfigError, match=refusal):
        store.write_layer(0, random_layer(0))
    assert os.listdir(tmp_path) == []


def test_a_write_blocked_by_a_folder_is_refused_in_one_line(tmp_path):
    from vllm_expertflow.core.config import ExpertFlowConfigError

    (tmp_path / "layer_1.bin").mkdir()  # foreign content where a layer file belongs
    store = DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    with pytest.raises(ExpertFlowConfigError) as error:
        write_store(store)
    message = str(error.value)
    assert "\n" not in message
    assert f"writing the disk store failed at {tmp_path / 'layer_1.bin'}: Is a directory" in message
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


# A child writes a 3-layer store and stops at one point of the write; the test kills it there.
_KILLED_WRITER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_store
from vllm_expertflow.core import disk_store

point = sys.argv[2]
def stop():
    print("stopped", flush=True)
    time.sleep(600)

replace, write_manifest = os.replace, disk_store.write_text_atomically
def replace_then_stop(*args):  # the first layer renamed into place, the others not yet
    replace(*args)
    stop()
def stop_in_manifest(path, text, durable=False):  # the manifest's temporary file half written
    Path(path).with_name(f".{{Path(path).name}}.{{os.getpid()}}.tmp").write_text(text[:40])
    stop()
if point == "renames":
    disk_store.os.replace = replace_then_stop
if point == "manifest":
    disk_store.write_text_atomically = stop_in_manifest

store = disk_store.DiskStore(sys.argv[1], test_store.FINGERPRINT, test_store.NUM_EXPERTS)
store.write_layer(0, test_store.random_layer(0))
if point == "first-layer":
    stop()
for layer in (1, 2):
    store.write_layer(layer, test_store.random_layer(layer))
if point == "all-layers":
    stop()
store.finish_writing()
"""


@pytest.mark.parametrize("point", ["first-layer", "all-layers", "renames", "manifest"])
def test_a_write_killed_at_any_point_is_cleaned_up_and_rewritten(tmp_path, point):
    import signal
    import subprocess
    import sys

    script = _KILLED_WRITER.format(tests=os.path.dirname(__file__))
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path), point], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "stopped"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert any(name.endswith(".tmp") for name in os.listdir(tmp_path)), "killed mid-write"

    store = DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
    assert not any(store.has_layer(layer) for layer in (0, 1, 2))  # no manifest was written
    write_store(store, layers=(0, 1, 2))
    assert_round_trip_bit_exact(store, layers=(0, 1, 2))
    assert sorted(os.listdir(tmp_path)) == [*(f"layer_{i}.bin" for i in range(3)), MANIFEST]
