import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from vllm_expertflow.core.disk_store import MANIFEST, DiskStore
from vllm_expertflow.core.store_catalog import (
    list_stores,
    store_fingerprint,
    store_folder,
    store_key,
    why_unused,
)

EXPERT = "model.layers.0.mlp.experts.0.w1.weight"
EMBEDDING = "model.embed_tokens.weight"


def save_checkpoint(folder, expert_scale=1.0, embedding_scale=1.0, seed=0):
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        EXPERT: torch.randn(64, 256, generator=g) * expert_scale,
        EMBEDDING: torch.randn(32, 64, generator=g) * embedding_scale,
    }
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def fingerprint_of(folder) -> dict:
    return store_fingerprint(str(folder), "a kernel layout", "torch.bfloat16", 2)


def write_store(store_dir, model) -> DiskStore:
    fingerprint = fingerprint_of(model)
    directory = store_folder(str(store_dir), str(model), fingerprint)
    store = DiskStore(directory, fingerprint, 2, str(model))
    store.write_layer(0, {"w13": torch.randn(2, 4, 4)})
    store.finish_writing()
    store.close()
    return store


def test_the_key_follows_the_expert_bytes_not_the_files_path_or_times(tmp_path):
    model = save_checkpoint(tmp_path / "model")
    key = store_key(fingerprint_of(model))
    moved = tmp_path / "snapshot-2"
    shutil.copytree(model, moved)
    os.utime(moved / "model.safetensors", (1, 1))  # a re-download: same bytes, new time
    assert store_key(fingerprint_of(moved)) == key
    save_checkpoint(model, embedding_scale=2.0)  # what the store does not hold
    assert store_key(fingerprint_of(model)) == key
    save_checkpoint(model, expert_scale=1.001)  # a fine-tune of the experts
    assert store_key(fingerprint_of(model)) != key


def test_a_moved_checkpoint_finds_its_store_and_the_manifest_follows_it(tmp_path):
    model = save_checkpoint(tmp_path / "model")
    first = write_store(tmp_path / "stores", model)
    moved = tmp_path / "moved"
    shutil.move(model, moved)
    directory = store_folder(str(tmp_path / "stores"), str(moved), fingerprint_of(moved))
    assert directory == first.directory
    reused = DiskStore(directory, fingerprint_of(moved), 2, str(moved))
    assert reused.has_layer(0)
    reused.finish_writing()
    reused.close()
    [store] = list_stores(str(tmp_path / "stores"))
    assert store.model == str(moved) and store.complete


def test_gc_removes_incomplete_stale_and_orphaned_stores_and_keeps_the_rest(tmp_path):
    stores = tmp_path / "stores"
    kept = write_store(stores, save_checkpoint(tmp_path / "kept", seed=1))
    stale_model = save_checkpoint(tmp_path / "stale", seed=2)
    stale = write_store(stores, stale_model)
    save_checkpoint(stale_model, expert_scale=3.0)
    orphan_model = save_checkpoint(tmp_path / "orphan", seed=3)
    orphan = write_store(stores, orphan_model)
    shutil.rmtree(orphan_model)
    truncated = write_store(stores, save_checkpoint(tmp_path / "truncated", seed=4))
    with open(os.path.join(truncated.directory, "layer_0.bin"), "r+b") as f:
        f.truncate(100)
    (stores / "killed-0123").mkdir()  # a first write killed before its manifest
    (stores / "killed-0123" / "layer_0.bin.77.tmp").write_bytes(b"x" * 10)
    older = write_store(stores, save_checkpoint(tmp_path / "older", seed=5))
    manifest = os.path.join(older.directory, MANIFEST)
    with open(manifest) as f:
        text = f.read().replace('"format": 3', '"format": 2')
    with open(manifest, "w") as f:
        f.write(text)

    reasons = {os.path.basename(s.path): why_unused(s) for s in list_stores(str(stores))}
    assert reasons[os.path.basename(kept.directory)] is None
    assert "has changed" in reasons[os.path.basename(stale.directory)]
    assert "no longer exists" in reasons[os.path.basename(orphan.directory)]
    assert "wrong size" in reasons[os.path.basename(truncated.directory)]
    assert "no manifest" in reasons["killed-0123"]
    assert "older ExpertFlow" in reasons[os.path.basename(older.directory)]


def test_a_store_a_process_has_open_is_never_unused(tmp_path):
    model = save_checkpoint(tmp_path / "model")
    store = write_store(tmp_path / "stores", model)
    shutil.rmtree(model)
    with open(os.path.join(store.directory, "layer_0.bin"), "rb"):
        [info] = list_stores(str(tmp_path / "stores"))
        assert info.in_use and why_unused(info) is None
    [info] = list_stores(str(tmp_path / "stores"))
    assert not info.in_use and why_unused(info) is not None


@pytest.mark.parametrize("missing", ["folder", "empty"])
def test_no_stores_lists_nothing(tmp_path, missing):
    if missing == "empty":
        (tmp_path / "stores").mkdir()
    assert list_stores(str(tmp_path / "stores")) == []


def test_a_shard_without_expert_tensors_does_not_change_the_key(tmp_path):
    model = save_checkpoint(tmp_path / "model")
    key = store_key(fingerprint_of(model))
    save_file({EMBEDDING: torch.randn(32, 64)}, str(model / "model-2.safetensors"))
    assert store_key(fingerprint_of(model)) == key
    save_file({EMBEDDING: torch.ones(32, 64)}, str(model / "model-2.safetensors"))
    assert store_key(fingerprint_of(model)) == key
