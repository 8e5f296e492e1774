"""Options checked against the model and the machine before any engine starts."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from vllm_expertflow.core.checkpoint import routing_config_hash
from vllm_expertflow.core.config import ExpertFlowConfig, ExpertFlowConfigError
from vllm_expertflow.core.disk_store import DiskStore
from vllm_expertflow.core.model_shape import MoEShape
from vllm_expertflow.core.predictor import TransitionPredictor, save_predictor
from vllm_expertflow.core.preflight import expert_bytes, preflight
from vllm_expertflow.core.store_catalog import store_fingerprint, store_folder

SHAPE = MoEShape(num_layers=4, num_experts=8, top_k=2)


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "tiny-moe"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    tensors = {
        "model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(16, 8, dtype=torch.bfloat16),
        "model.layers.0.mlp.shared_experts.up_proj.weight": torch.zeros(4, 4),
        "model.layers.0.mlp.gate.weight": torch.zeros(8, 8),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


def check(model_dir, **options):
    preflight(ExpertFlowConfig.from_dict(options), model_dir, SHAPE)


def test_the_shape_is_read_across_families_key_names():
    assert MoEShape.of({"num_hidden_layers": 4, "num_local_experts": 8, "num_experts_per_tok": 2})
    assert MoEShape.of(
        {"text_config": {"num_hidden_layers": 2, "n_routed_experts": 64, "num_experts_per_tok": 6}}
    ) == MoEShape(2, 64, 6)
    assert MoEShape.of({"num_hidden_layers": 4, "intermediate_size": 64}) is None


def test_a_cache_smaller_than_top_k_is_refused(model_dir):
    with pytest.raises(ExpertFlowConfigError, match="cache_experts=1 is smaller than.*top-k of 2"):
        check(model_dir, cache_experts=1)
    check(model_dir, cache_experts=2)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("[[0, 1], ", "is not valid JSON"),
        ('{"0": 1}', "must hold a list"),
        ("[[0, 1], [4, 0]]", r"names \[4, 0\], not \[layer, expert\] pairs of this model"),
        (
            "[[4, 0], [0, 1], [0, 8], [-1, 2], [9, 9], [5, 5]]",
            r"names \[4, 0\], \[0, 8\], \[-1, 2\] and 2 more, not",
        ),
        ("[[0, 8]]", r"names \[0, 8\]"),
        ('[[0, "1"]]', "names"),
    ],
)
def test_static_experts_files_are_checked(model_dir, tmp_path, content, message):
    path = tmp_path / "hot.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ExpertFlowConfigError, match=message):
        check(model_dir, policy="static", static_experts=str(path))


def test_a_good_static_experts_file_passes(model_dir, tmp_path):
    path = tmp_path / "hot.json"
    path.write_text("[[0, 1], [3, 7]]")
    check(model_dir, policy="static", static_experts=str(path))


def test_predictor_files_are_checked(model_dir, tmp_path):
    missing = str(tmp_path / "none.safetensors")
    with pytest.raises(ExpertFlowConfigError, match="none.safetensors does not exist"):
        check(model_dir, predictor=missing)
    counts = {(0, 1): torch.zeros(8, 8)}
    totals = {0: torch.zeros(8), 1: torch.zeros(8)}

    def transition(origin_hash: str) -> TransitionPredictor:
        return TransitionPredictor([0, 1], 1, counts, totals, {"config_hash": origin_hash})

    ours, other = str(tmp_path / "ours.safetensors"), str(tmp_path / "other.safetensors")
    save_predictor(transition(routing_config_hash(model_dir)), ours)
    check(model_dir, predictor=ours)
    save_predictor(transition("0" * 64), other)
    with pytest.raises(ExpertFlowConfigError, match="trained for model config hash 0000"):
        check(model_dir, predictor=other)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(ours, "rb").read()[:40])
    with pytest.raises(ExpertFlowConfigError, match="cannot be read"):
        check(model_dir, predictor=str(truncated))


def test_store_dir_must_be_a_writable_folder_with_room(model_dir, tmp_path, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(ExpertFlowConfigError, match="is not a directory"):
        check(model_dir, store="disk", store_dir=str(a_file))
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(ExpertFlowConfigError, match="is not writable"):
            check(model_dir, store="disk", store_dir=str(read_only / "stores"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100))
    with pytest.raises(ExpertFlowConfigError, match=r"needs about 256 bytes but .* 100 bytes free"):
        check(model_dir, store="disk", store_dir=str(tmp_path / "stores"))
    # A complete store of these experts already there is reused: no estimate applies.
    monkeypatch.undo()
    fingerprint = store_fingerprint(str(model_dir), "a kernel layout", "torch.bfloat16", 2)
    store_dir = str(tmp_path / "stores")
    store = DiskStore(store_folder(store_dir, str(model_dir), fingerprint), fingerprint, 2)
    store.write_layer(0, {"w13": torch.zeros(2, 4, 4)})
    store.finish_writing()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100))
    check(model_dir, store="disk", store_dir=store_dir)


def test_expert_bytes_counts_routed_experts_only(model_dir):
    assert expert_bytes(model_dir) == 16 * 8 * 2
