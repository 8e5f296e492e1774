"""Which disk store belongs to which checkpoint: store identity by content, and the stores of a
`store_dir` as a user sees them (`vllm-expertflow store list` / `gc`).

A store's key is what its bytes depend on, not where the checkpoint lies or when it was
touched: the routed-expert tensors' names, dtypes and shapes, a sample of their bytes, the
kernel layout they are stored in, the dtype and the expert count. A re-downloaded or `touch`ed
checkpoint therefore finds its store again. The sample (64 blocks of 4 KiB spread over each
file's expert bytes) reads a few MiB even for a model of hundreds of GB; a fine-tune rewrites
nearly every weight, so its samples differ. Integrity of the stored bytes themselves is the
store's own: a checksum per record, checked at start-up and on every read (`disk_store`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from dataclasses import dataclass

import xxhash

from .checkpoint import is_expert_tensor, safetensors_header
from .disk_store import FORMAT_VERSION, MANIFEST, layer_file_name

KEY_CHARS = 16  # of the key's hex digest, in the folder name
_SAMPLES_PER_FILE = 64
_SAMPLE_BYTES = 4096


def store_fingerprint(model: str, store_format: str, dtype: str, num_experts: int) -> dict:
    """What a store's bytes depend on; its digest is the store's key. `model` is a checkpoint
    folder, or a hub id, which is identified by name (its files are resolved by vLLM)."""
    content = (
        {"experts": checkpoint_expert_digest(model)} if os.path.isdir(model) else {"model": model}
    )
    return {**content, "format": store_format, "dtype": dtype, "num_experts": num_experts}


def store_key(fingerprint: dict) -> str:
    return xxhash.xxh3_128_hexdigest(json.dumps(fingerprint, sort_keys=True).encode())[:KEY_CHARS]


def store_folder(store_dir: str, model_dir: str, fingerprint: dict) -> str:
    """The folder of the store with this fingerprint: an existing one, whatever the checkpoint
    folder was called when it was written, or a new `<checkpoint folder name>-<key>`."""
    key = store_key(fingerprint)
    existing = sorted(glob.glob(os.path.join(glob.escape(store_dir), f"*-{key}")))
    if existing:
        return existing[0]
    name = os.path.basename(os.path.normpath(model_dir)) or "model"
    return os.path.join(store_dir, f"{name}-{key}")


def checkpoint_expert_digest(model_dir: str) -> str:
    """A digest of the checkpoint's routed-expert tensors: every one's name, dtype and shape,
    and sampled bytes. Files that hold no expert tensor do not count; a checkpoint whose expert
    tensors are not recognisable by name is sampled whole."""
    headers = [
        (path, *safetensors_header(path))
        for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    ]
    named = any(is_expert_tensor(name) for _, tensors, _ in headers for name in tensors)
    digest = xxhash.xxh3_128()
    for path, tensors, data_start in headers:
        experts = {n: t for n, t in tensors.items() if is_expert_tensor(n) or not named}
        if not experts:
            continue
        ranges = sorted(tuple(t["data_offsets"]) for t in experts.values())
        for name in sorted(experts):
            digest.update(f"{name}:{experts[name]['dtype']}:{experts[name]['shape']};".encode())
        with open(path, "rb") as f:
            for offset, length in _samples(ranges):
                f.seek(data_start + offset)
                digest.update(f.read(length))
    return digest.hexdigest()


def _samples(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) of blocks spread evenly over the concatenated byte ranges, the first
    and last byte included; a block never runs past its range (into non-expert bytes)."""
    total = sum(end - start for start, end in ranges)
    if total == 0:
        return []
    wanted = [i * (total - 1) // (_SAMPLES_PER_FILE - 1) for i in range(_SAMPLES_PER_FILE)]
    samples, passed, index = [], 0, 0
    for start, end in ranges:
        while index < len(wanted) and wanted[index] < passed + end - start:
            offset = start + wanted[index] - passed
            samples.append((offset, min(_SAMPLE_BYTES, end - offset)))
            index += 1
        passed += end - start
    return samples


@dataclass(frozen=True)
class StoreInfo:
    path: str
    model: str  # the checkpoint folder it was written from, as recorded
    size_bytes: int
    age_seconds: float
    complete: bool  # a manifest and every layer file it names, of the right size
    in_use: bool  # some process has one of its files open
    format: int | None  # the manifest's store format; None without a readable manifest
    fingerprint: dict | None  # None unless the manifest is of this ExpertFlow's format


def list_stores(store_dir: str) -> list[StoreInfo]:
    """Every store folder in `store_dir` (folders without a manifest included), oldest first."""
    if not os.path.isdir(store_dir):
        return []
    open_paths = _open_paths()
    stores = []
    for name in sorted(os.listdir(store_dir)):
        path = os.path.join(store_dir, name)
        if not os.path.isdir(path):
            continue
        manifest = _read_manifest(path)
        current = manifest is not None and manifest.get("format") == FORMAT_VERSION
        stores.append(
            StoreInfo(
                path=path,
                model=str(manifest.get("model", "?")) if manifest else "?",
                size_bytes=_folder_bytes(path),
                age_seconds=time.time() - os.path.getmtime(path),
                complete=current and _is_complete(path, manifest),
                in_use=any(p.startswith(path + os.sep) for p in open_paths),
                format=manifest.get("format") if manifest else None,
                fingerprint=_fingerprint_of(manifest) if current else None,
            )
        )
    return sorted(stores, key=lambda s: -s.age_seconds)


def why_unused(store: StoreInfo) -> str | None:
    """Why `store gc` may remove the store, or None to keep it.

    Kept: a store some process has open, and one of a hub model (named, not keyed by content).
    Removed: an incomplete one, one of an older format, one whose checkpoint folder is gone,
    and one whose checkpoint has changed since it was written (its key no longer matches)."""
    if store.in_use:
        return None
    if store.format is None:
        return "incomplete: no manifest (a write that did not finish)"
    if store.format != FORMAT_VERSION:
        return f"store format {store.format}, written by an older ExpertFlow"
    if store.fingerprint is None:
        return "its manifest is damaged"
    if not store.complete:
        return "incomplete or damaged: a layer file is missing or has the wrong size"
    if "model" in store.fingerprint:
        return None
    if not os.path.isdir(store.model):
        return f"its checkpoint {store.model} no longer exists"
    fingerprint = store.fingerprint
    current = store_fingerprint(
        store.model, fingerprint["format"], fingerprint["dtype"], fingerprint["num_experts"]
    )
    if store_key(current) != store_key(fingerprint):
        return f"stale: {store.model} has changed since the store was written"
    return None


def remove_store(store: StoreInfo) -> None:
    shutil.rmtree(store.path)


def _read_manifest(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _fingerprint_of(manifest: dict | None) -> dict | None:
    fingerprint = (manifest or {}).get("fingerprint")
    keys = {"format", "dtype", "num_experts"}
    return fingerprint if isinstance(fingerprint, dict) and keys <= set(fingerprint) else None


def _is_complete(path: str, manifest: dict) -> bool:
    layers, stride, experts = (manifest.get(k) for k in ("layers", "record_stride", "num_experts"))
    if not (isinstance(layers, dict) and layers and isinstance(stride, int)):
        return False
    if not isinstance(experts, int) or not all(layer.isdigit() for layer in layers):
        return False
    for layer in layers:
        file = os.path.join(path, layer_file_name(int(layer)))
        if not os.path.isfile(file) or os.path.getsize(file) != stride * experts:
            return False
    return True


def _folder_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def _open_paths() -> set[str]:
    """Files any process of this user has open (Linux /proc; empty elsewhere)."""
    paths = set()
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                paths.add(os.readlink(os.path.join(fd_dir, name)))
            except OSError:
                continue
    return paths
