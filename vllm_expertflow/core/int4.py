"""Group-quantized int4 weights in compressed-tensors' packing, expanded fast enough for every step.

The packing (what `vllm-expertflow quantize` writes, GPTQ or AWQ):
- `packed`: int32 `[..., N, K/8]`, eight 4-bit codes per word, lowest nibble first, each code
  the signed value plus 8;
- `scale`: `[..., N, K/group]` in the model's float dtype;
- `zero_point` (asymmetric schemes only): int32 `[..., N/8, K/group]`, eight rows' codes per
  word, packed down the rows.

A weight is `(code - zero) * scale`, computed in the scale's dtype: the difference is a small
integer, exact in any float type, so the product is rounded once, exactly as compressed-tensors'
own decompressor rounds it (tested bit for bit). Viewing the words as bytes yields two codes per
byte in order, which saves its eight strided passes over the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_BITS = 4
_CODES_PER_WORD = 32 // _BITS
_CODE_OFFSET = 1 << (_BITS - 1)  # stored codes are the signed value + 8


@dataclass(frozen=True)
class Int4Packing:
    group_size: int
    symmetric: bool

    def dequantize(
        self,
        packed: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Writes the `[..., N, K]` weight of `packed` (leading dims, e.g. experts) into `out`,
        which must have the scale's dtype.

        Computed in place in `out`, a few passes over it: the codes are converted straight into
        it (even and odd positions), offset, then scaled per group. Temporaries stay at a byte
        per two codes, so a big batch does not fault in fresh pages for every step.
        """
        *lead, rows, cols = out.shape
        groups = cols // self.group_size
        assert packed.dtype == torch.int32 and packed.shape[-1] * _CODES_PER_WORD == cols
        assert out.dtype == scale.dtype, "codes are offset and scaled in the scale's dtype"
        # Little-endian words: byte j holds codes 2j (low nibble) and 2j + 1 (high nibble).
        packed_bytes = packed.contiguous().view(torch.uint8)
        code_pairs = out.view(*lead, rows, cols // 2, 2)
        nibbles = packed_bytes & 0xF
        code_pairs[..., 0].copy_(nibbles)
        torch.bitwise_right_shift(packed_bytes, _BITS, out=nibbles)
        code_pairs[..., 1].copy_(nibbles)
        grouped = out.view(*lead, rows, groups, self.group_size)
        # Small integers, so these are exact in any float type: one rounding, in the multiply.
        if self.symmetric:
            out.sub_(_CODE_OFFSET)
        else:
            assert zero_point is not None, "an asymmetric scheme has zero points"
            zeros = self.unpack_zero_points(zero_point, rows).to(out.dtype)
            grouped.sub_(zeros.unsqueeze(-1))
        grouped.mul_(scale.unsqueeze(-1))
        return out

    @staticmethod
    def unpack_zero_points(zero_point: torch.Tensor, rows: int) -> torch.Tensor:
        """`[..., N/8, G]` words packed down the rows -> `[..., N, G]` int8 codes (0..15)."""
        shifts = torch.arange(0, 32, _BITS, dtype=torch.int32, device=zero_point.device)
        codes = (zero_point.unsqueeze(-2) >> shifts.view(-1, 1)) & 0xF  # [..., N/8, 8, G]
        *lead, words, per_word, groups = codes.shape
        return codes.reshape(*lead, words * per_word, groups)[..., :rows, :].to(torch.int8)

    @staticmethod
    def pack_zero_points(codes: torch.Tensor) -> torch.Tensor:
        """`[N, G]` codes (0..15) -> `[ceil(N/8), G]` int32 words packed down the rows."""
        rows, groups = codes.shape
        padded = torch.zeros(
            -(-rows // _CODES_PER_WORD) * _CODES_PER_WORD, groups, dtype=torch.int64
        )
        padded[:rows] = codes.to(torch.int64) & 0xF
        shifts = torch.arange(0, 32, _BITS, dtype=torch.int64).view(-1, 1)
        words = (padded.view(-1, _CODES_PER_WORD, groups) << shifts).sum(dim=1)
        # Words are 32-bit two's complement: the top nibble's bit 31 is the sign.
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
