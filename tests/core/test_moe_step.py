"""The MoE step on a real pool with a plain-torch kernel injected, against dense experts."""

import pytest
import torch

from vllm_expertflow.core.decode_scratch import DecodeScratch
from vllm_expertflow.core.moe_step import GraphStep, HostStep
from vllm_expertflow.core.policy import LRUPolicy
from vllm_expertflow.core.pool import ExpertPool
from vllm_expertflow.core.stats import OffloadStats
from vllm_expertflow.core.store import ExpertCodec, RamStore, TensorSpec

NUM_EXPERTS, HIDDEN, INTER, LAYERS = 8, 6, 4, (2, 5)


def silu_experts(x, w13, w2, topk_weights, experts_of_token):
    """out[t] = sum_k weight * w2[e] @ (silu(gate) * up), with e looked up per token."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(experts_of_token.shape[1]):
            e = int(experts_of_token[t, k])
            gate, up = w13[e][:INTER] @ x[t], w13[e][INTER:] @ x[t]
            out[t] += topk_weights[t, k] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def slot_kernel(x, topk_weights, slot_ids, weights):
    return silu_experts(x, weights["w13"], weights["w2"], topk_weights, slot_ids)


def paged_kernel(x, topk_ids, topk_weights, row, w13_pool, w2_pool, w13_host, w2_host):
    """A miss (row < 0) reads the host copy, as the graph step's kernel does."""
    w13 = torch.stack([w13_pool[s] if s >= 0 else w13_host[e] for e, s in enumerate(row.tolist())])
    w2 = torch.stack([w2_pool[s] if s >= 0 else w2_host[e] for e, s in enumerate(row.tolist())])
    return silu_experts(x, w13, w2, topk_weights, topk_ids)


def make_pool(num_slots: int) -> tuple[ExpertPool, dict[int, dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    store = RamStore(NUM_EXPERTS, pin_memory=False)
    weights = {}
    for layer in LAYERS:
        weights[layer] = {
            "w13": torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN, dtype=torch.float64),
            "w2": torch.randn(NUM_EXPERTS, HIDDEN, INTER, dtype=torch.float64),
        }
        store.write_layer(layer, weights[layer])
    store.finish_writing()
    pool = ExpertPool(store, num_slots, torch.device("cpu"), LAYERS, LRUPolicy(), OffloadStats())
    return pool, weights


def routing(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:2] for _ in range(num_tokens)])
    return x, torch.rand(num_tokens, 2, generator=gen, dtype=torch.float64), ids


def test_a_batch_wider_than_the_pool_runs_in_rounds_and_equals_the_dense_layer():
    pool, weights = make_pool(num_slots=3)
    calls = []

    def counting_kernel(x, topk_weights, slot_ids, weights):
        calls.append(x.shape[0])
        assert slot_ids.unique().numel() <= 3
        return slot_kernel(x, topk_weights, slot_ids, weights)

    step = HostStep(pool, lambda layer: counting_kernel, prefetcher=None)
    x, topk_weights, topk_ids = routing(num_tokens=10, seed=1)
    out = step.run(5, x, topk_weights, topk_ids)
    dense = weights[5]
    assert torch.allclose(out, silu_experts(x, dense["w13"], dense["w2"], topk_weights, topk_ids))
    assert len(calls) > 1 and sum(calls) == 10  # several rounds, every token once
    assert not any(pool.table.is_pinned(slot) for slot in range(pool.num_slots))
    assert pool.stats.layer(5).misses >= topk_ids.unique().numel()
    assert pool.table.num_resident_in(2) == 0


def test_one_round_hits_what_the_previous_call_loaded():
    pool, weights = make_pool(num_slots=8)
    step = HostStep(pool, lambda layer: slot_kernel, prefetcher=None)
    x, topk_weights, topk_ids = routing(num_tokens=2, seed=2)
    first = step.run(2, x, topk_weights, topk_ids)
    second = step.run(2, x, topk_weights, topk_ids)
    assert torch.equal(first, second)
    stats = pool.stats.layer(2)
    assert stats.hits == stats.misses == topk_ids.unique().numel()


def test_graph_step_reads_misses_from_the_store_and_loads_them_between_forwards():
    pool, weights = make_pool(num_slots=4)
    step = GraphStep(pool, pool.store, paged_kernel, max_tokens=64)
    x, topk_weights, topk_ids = routing(num_tokens=1, seed=3)
    dense = weights[2]
    expected = silu_experts(x, dense["w13"], dense["w2"], topk_weights, topk_ids)
    assert torch.allclose(step.run(2, x, topk_weights, topk_ids), expected)
    assert pool.table.num_resident == 0  # nothing booked inside the forward
    step.between_forwards()
    pool.drain()
    assert sorted(e for _, e in pool.table.resident_keys()) == sorted(topk_ids[0].tolist())
    assert torch.allclose(step.run(2, x, topk_weights, topk_ids), expected)
    step.between_forwards()
    stats = pool.stats.layer(2)
    assert (stats.misses, stats.hits) == (2, 2)


class HalvedCodec(ExpertCodec):
    """Records hold each weight halved (`w13_half`, `w2_half`); decoding doubles them."""

    def slot_specs(self, layout):
        return tuple(
            TensorSpec(part.name.removesuffix("_half"), part.shape, part.dtype)
            for part in layout.parts
        )

    def decode(self, records, slots):
        for name, out in slots.items():
            torch.mul(records[f"{name}_half"], 2, out=out)


def test_a_pool_of_stored_records_is_decoded_a_scratch_at_a_time_and_equals_the_dense_layer():
    _, weights = make_pool(num_slots=5)
    halved = RamStore(NUM_EXPERTS, pin_memory=False)
    for layer in LAYERS:
        halved.write_layer(layer, {f"{n}_half": w / 2 for n, w in weights[layer].items()})
    halved.finish_writing()
    pool = ExpertPool(halved, 5, torch.device("cpu"), LAYERS, LRUPolicy(), OffloadStats())
    scratch = DecodeScratch(pool, HalvedCodec(), capacity=3)
    calls = []

    def counting_kernel(x, topk_weights, scratch_ids, tensors):
        calls.append(scratch_ids.unique().numel())
        assert tensors is scratch.tensors and scratch_ids.max() < 3
        return slot_kernel(x, topk_weights, scratch_ids, tensors)

    step = HostStep(pool, lambda layer: counting_kernel, prefetcher=None, scratch=scratch)
    for num_tokens, seed in ((1, 0), (6, 1), (6, 2)):
        x, topk_weights, topk_ids = routing(num_tokens, seed)
        out = step.run(5, x, topk_weights, topk_ids)
        dense = weights[5]
        expected = silu_experts(x, dense["w13"], dense["w2"], topk_weights, topk_ids)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert max(calls) <= 3 and len(calls) > 3  # wide batches ran several scratch-fulls
    assert pool.stats.layer(5).experts_decoded == sum(calls)
    # The pool keeps the records as stored: halved weights, not the kernel's.
    layer, expert = next(iter(pool.table.resident_keys()))
    slot = pool.table.lookup((layer, expert))
    assert torch.equal(pool.slot_tensors["w13_half"][slot], weights[layer]["w13"][expert] / 2)


def test_a_kernel_that_raises_leaves_no_slot_pinned():
    pool, _ = make_pool(num_slots=3)

    def failing_kernel(x, topk_weights, slot_ids, weights):
        raise RuntimeError("kernel failed")

    for num_tokens in (1, 10):  # one round, several rounds
        step = HostStep(pool, lambda layer: failing_kernel, prefetcher=None)
        x, topk_weights, topk_ids = routing(num_tokens, seed=3)
        with pytest.raises(RuntimeError, match="kernel failed"):
            step.run(5, x, topk_weights, topk_ids)
        assert not any(pool.table.is_pinned(slot) for slot in range(pool.num_slots))
