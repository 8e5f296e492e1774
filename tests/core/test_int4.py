"""Serving's int4 unpacking against compressed-tensors' own decompressor: equal bit for bit."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from vllm_expertflow.core.int4 import Int4Packing
from vllm_expertflow.tools.quantize import dequantize_packed

GROUP = 32


def packed_weight(rows: int, cols: int, symmetric: bool, dtype: torch.dtype, seed: int):
    """Random codes, scales and zero points, packed as `vllm-expertflow quantize` writes them."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols), generator=generator)
    scale = (torch.rand(rows, cols // GROUP, generator=generator) * 0.02 + 1e-3).to(dtype)
    packed = pack_to_int32((codes - 8).to(torch.int8), 4)
    if symmetric:
        return packed, scale, None
    zeros = torch.randint(0, 16, (rows, cols // GROUP), generator=generator)
    return packed, scale, pack_to_int32((zeros - 8).to(torch.int8), 4, packed_dim=0)


@pytest.mark.parametrize("symmetric", [True, False], ids=["gptq-sym", "awq-asym"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_equals_compressed_tensors_bit_for_bit(symmetric, dtype):
    # 36 rows: the zero points' last word packs only four rows.
    rows, cols, experts = 36, 128, 3
    weights = [packed_weight(rows, cols, symmetric, dtype, seed) for seed in range(experts)]
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=GROUP, symmetric=symmetric)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    expected = torch.stack([dequantize_packed(scheme, (rows, cols), *w) for w in weights])

    packing = Int4Packing(GROUP, symmetric)
    out = torch.empty(experts, rows, cols, dtype=dtype)
    batched = [
        torch.stack(parts) if parts[0] is not None else None for parts in zip(*weights, strict=True)
    ]
    packing.dequantize(*batched, out=out)

    assert out.dtype == expected.dtype
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_zero_points_unpack_down_the_rows():
    zeros = torch.randint(0, 16, (12, 4))
    packed = pack_to_int32((zeros - 8).to(torch.int8), 4, packed_dim=0)
    assert torch.equal(Int4Packing.unpack_zero_points(packed, 12), zeros.to(torch.int8))
