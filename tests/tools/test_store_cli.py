import torch
from safetensors.torch import save_file

from vllm_expertflow.cli import main
from vllm_expertflow.core.disk_store import DiskStore
from vllm_expertflow.core.store_catalog import store_fingerprint, store_folder


def test_list_shows_every_store_and_gc_removes_only_the_unused(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    save_file(
        {"model.layers.0.mlp.experts.0.w1.weight": torch.ones(8, 8)}, str(model / "m.safetensors")
    )
    stores = tmp_path / "stores"
    fingerprint = store_fingerprint(str(model), "layout", "torch.bfloat16", 2)
    store = DiskStore(
        store_folder(str(stores), str(model), fingerprint), fingerprint, 2, str(model)
    )
    store.write_layer(0, {"w13": torch.zeros(2, 4)})
    store.finish_writing()
    store.close()
    (stores / "model-killed").mkdir()

    assert main(["store", "list", "--store-dir", str(stores)]) == 0
    listed = capsys.readouterr().out
    assert f"{store.directory}  " in listed and "complete  model " + str(model) in listed
    assert "model-killed" in listed and "incomplete" in listed

    assert main(["store", "gc", "--store-dir", str(stores), "--yes"]) == 0
    assert "unused: incomplete: no manifest" in capsys.readouterr().out
    assert sorted(p.name for p in stores.iterdir()) == [store.directory.rsplit("/", 1)[1]]
    assert main(["store", "gc", "--store-dir", str(stores)]) == 0  # nothing left to ask about
    assert "nothing to remove" in capsys.readouterr().out
