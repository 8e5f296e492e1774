import json
import os

import pytest
import torch

from vllm_expertflow.core.disk_store import MANIFEST, DiskStore
from vllm_expertflow.core.store import RamStore

NUM_EXPERTS = 5
FINGERPRINT = {"model": "tiny", "dtype": "bfloat16"}


def random_layer(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn(NUM_EXPERTS, 64, 32, generator=generator).to(torch.bfloat16)
    w2 = torch.randn(NUM_EXPERTS, 32, 32, generator=generator).to(torch.bfloat16)
    return w13, w2


def write_store(store, layers=(0, 1)):
    for layer in layers:
        store.write_layer(layer, *random_layer(layer))
    store.finish_writing()


def assert_round_trip_bit_exact(store, layers=(0, 1)):
    for layer in layers:
        w13, w2 = random_layer(layer)
        for expert in range(NUM_EXPERTS):
            w13_out, w2_out = torch.zeros_like(w13[0]), torch.zeros_like(w2[0])
            store.read_expert(layer, expert, w13_out, w2_out)
            assert torch.equal(w13_out.view(torch.int16), w13[expert].view(torch.int16))
            assert torch.equal(w2_out.view(torch.int16), w2[expert].view(torch.int16))


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
    store.write_layer(1, *random_layer(1))
    store.finish_writing()
    assert_round_trip_bit_exact(store)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert set(manifest["layers"]) == {"0", "1"}


def test_unfinished_write_leaves_no_usable_store(tmp_path):
    store = DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS)
    store.write_layer(0, *random_layer(0))  # the process dies before finish_writing
    assert not os.path.exists(tmp_path / MANIFEST)
    assert not DiskStore(str(tmp_path), FINGERPRINT, NUM_EXPERTS).has_layer(0)


def test_mismatched_layout_is_refused():
    store = RamStore(NUM_EXPERTS, pin_memory=False)
    store.write_layer(0, *random_layer(0))
    w13, w2 = random_layer(1)
    with pytest.raises(ValueError, match="expert layout"):
        store.write_layer(1, w13[:, :32], w2)
