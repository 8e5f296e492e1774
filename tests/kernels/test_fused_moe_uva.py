import pytest
import torch
from vllm_expertflow.kernels.fused_moe_uva import fused_moe_uva, fused_moe_uva_reference


def _case(generator, num_tokens, top_k, num_experts, num_slots, hidden, inter, dtype):
    def weights(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) / hidden**0.5).to(dtype)

    x = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    ids = torch.stack(
        [torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)]
    ).to(torch.int32)
    topk_weights = torch.rand(num_tokens, top_k, generator=generator) + 0.1
    # Some experts resident in random slots, the rest served from the host store.
    resident = torch.randperm(num_experts, generator=generator)[: num_slots // 2 + 1]
    row = torch.full((num_experts,), -1, dtype=torch.int32)
    row[resident] = torch.randperm(num_slots, generator=generator)[: len(resident)].int()
    pool = (weights(num_slots, 2 * inter, hidden), weights(num_slots, hidden, inter))
    host = (weights(num_experts, 2 * inter, hidden), weights(num_experts, hidden, inter))
    return x, ids, topk_weights, row, *pool, *host


@pytest.mark.parametrize(
    "num_tokens,top_k,hidden,inter,dtype",
    [
        (1, 2, 64, 32, torch.float32),
        (3, 2, 64, 32, torch.bfloat16),
        (5, 3, 48, 40, torch.float32),
        (2, 1, 80, 24, torch.bfloat16),
    ],
)
def test_matches_reference(generator, num_tokens, top_k, hidden, inter, dtype):
    args = _case(generator, num_tokens, top_k, 8, 4, hidden, inter, dtype)
    out = fused_moe_uva(*args, block_h=32, block_i=16)
    ref = fused_moe_uva_reference(*args)
    assert out.shape == ref.shape and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_reads_the_host_store_only_on_a_miss(generator):
    x, ids, topk_weights, row, w13_pool, w2_pool, w13_host, w2_host = _case(
        generator, 2, 2, 8, 4, 64, 32, torch.float32
    )
    out = fused_moe_uva(x, ids, topk_weights, row, w13_pool, w2_pool, w13_host, w2_host)
    # Poisoning the host copies of resident experts must not change the result.
    resident = row >= 0
    w13_host[resident] = float("nan")
    w2_host[resident] = float("nan")
    again = fused_moe_uva(x, ids, topk_weights, row, w13_pool, w2_pool, w13_host, w2_host)
    torch.testing.assert_close(again, out)


def test_rejects_large_batches():
    x = torch.zeros(65, 16)
    with pytest.raises(AssertionError):
        fused_moe_uva(
            x,
            torch.zeros(65, 1, dtype=torch.int32),
            torch.ones(65, 1),
            torch.zeros(2, dtype=torch.int32),
            torch.zeros(1, 8, 16),
            torch.zeros(1, 16, 4),
            torch.zeros(2, 8, 16),
            torch.zeros(2, 16, 4),
        )
