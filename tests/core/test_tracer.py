import torch

from vllm_expertflow.core.tracer import RoutingTracer, read_trace


def record_steps(tracer, steps: list[int], layers=(0, 1)):
    for num_tokens in steps:
        for layer in layers:
            hidden = torch.randn(num_tokens, 8)
            topk = torch.randint(0, 16, (num_tokens, 2))
            tracer.record(layer, hidden, topk, 2 * hidden)


def test_trace_round_trip_keeps_rows_aligned(tmp_path):
    tracer = RoutingTracer(str(tmp_path), {"model": "m"}, max_tokens=1000, shard_tokens=5)
    record_steps(tracer, [3, 4, 2])
    manifest = tracer.close()
    assert manifest["num_tokens"] == 9 and manifest["num_steps"] == 3
    assert len(manifest["shards"]) == 2
    _, tensors = read_trace(str(tmp_path))
    assert tensors["request_ids"].tolist() == [0] * 3 + [1] * 4 + [2] * 2
    assert tensors["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    assert tensors["hidden.1"].shape == (9, 8) and tensors["topk_ids.0"].shape == (9, 2)
    assert torch.equal(tensors["moe_output.1"], 2 * tensors["hidden.1"])


def test_token_budget_and_sampling_bound_the_trace(tmp_path):
    tracer = RoutingTracer(str(tmp_path), {}, max_tokens=50, sample_rate=0.5, seed=1)
    record_steps(tracer, [40] * 5)
    manifest = tracer.close()
    assert manifest["num_tokens"] == 50
    _, tensors = read_trace(str(tmp_path))
    first_step = tensors["positions"][tensors["request_ids"] == 0]
    assert 5 < len(first_step) < 35, "about half of a step's tokens are kept"


def test_a_routing_file_round_trips_and_bad_ones_are_named(tmp_path):
    import numpy as np
    import pytest

    from vllm_expertflow.core.tracer import read_routing_npz, write_routing_npz

    metadata = {"num_experts": 16, "top_k": 2, "layers": [0, 1]}
    tracer = RoutingTracer(str(tmp_path / "trace"), metadata, 10**6)
    record_steps(tracer, [3, 2, 4])
    tracer.close()
    manifest, tensors = read_trace(str(tmp_path / "trace"))
    write_routing_npz(manifest, tensors, str(tmp_path / "routing.npz"))
    read_manifest, read = read_routing_npz(str(tmp_path / "routing.npz"))
    assert read_manifest["layers"] == [int(layer) for layer in manifest["layers"]]
    assert (read_manifest["num_experts"], read_manifest["top_k"]) == (16, 2)
    for layer in read_manifest["layers"]:
        assert torch.equal(read[f"topk_ids.{layer}"], tensors[f"topk_ids.{layer}"].long())
    assert torch.equal(read["request_ids"], tensors["request_ids"].long())

    # Layers with any indices; request ids and expert count optional.
    np.savez(tmp_path / "other.npz", layers=[1, 3, 5], topk_ids=np.zeros((4, 3, 2), np.int32))
    other, read = read_routing_npz(str(tmp_path / "other.npz"))
    assert other["layers"] == [1, 3, 5] and other["num_experts"] == 1
    assert read["request_ids"].tolist() == [0, 0, 0, 0]
    np.savez(tmp_path / "bad.npz", layers=[1, 3], topk_ids=np.zeros((4, 3, 2), np.int32))
    with pytest.raises(ValueError, match=r"topk_ids must be \[tokens, 2 layers, top-k\]"):
        read_routing_npz(str(tmp_path / "bad.npz"))


def test_fitted_routing_keeps_the_source_order_and_gives_every_row_its_top_k():
    from vllm_expertflow.core.tracer import fit_routing

    g = torch.Generator().manual_seed(0)
    manifest = {"layers": [0, 1, 2], "num_experts": 16, "top_k": 2}
    tensors = {"request_ids": torch.zeros(50, dtype=torch.int64)}
    for layer in manifest["layers"]:
        tensors[f"topk_ids.{layer}"] = torch.stack(
            [torch.randperm(16, generator=g)[:2] for _ in range(50)]
        )

    # Four times the experts, twice the top-k: layer i takes the first expert of source layers
    # i .. i+3, each in its own quarter of the target's experts, so all 64 are in use.
    wide, routed = fit_routing(manifest, tensors, num_layers=5, num_experts=64, top_k=4)
    assert wide["layers"] == [0, 1, 2, 3, 4] and (wide["num_experts"], wide["top_k"]) == (64, 4)
    used = set()
    for i in range(5):
        ids = routed[f"topk_ids.{i}"]
        assert ids.shape == (50, 4) and all(len(set(row)) == 4 for row in ids.tolist())
        for r in range(4):
            source = tensors[f"topk_ids.{(i + r) % 3}"][:, 0]
            assert torch.equal(ids[:, r], source + 16 * r)  # the router's first choice, in order
        used |= set(ids.flatten().tolist())
    assert len(used) > 48

    # Fewer experts and a narrower top-k: folded, still distinct, still in range.
    _, folded = fit_routing(manifest, tensors, num_layers=2, num_experts=4, top_k=2)
    for ids in folded.values():
        if ids.dim() == 2:
            assert ids.max() < 4 and all(len(set(row)) == 2 for row in ids.tolist())
