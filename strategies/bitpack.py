"""Real bit packing for quantized messages (pure torch, vectorized).

Codes are packed little-endian inside each byte: code ``j`` of a byte sits at bits
``[j*bits, (j+1)*bits)``, so with 2 bits the first code is the lowest two bits.
A message of ``d`` codes at ``b`` bits takes exactly ``ceil(d * b / 8)`` bytes; the
unused high bits of the last byte are zero.
"""

from __future__ import annotations

import torch

VALID_BITS = (1, 2, 4, 8)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits each: ceil(count * bits / 8)."""
    _check_bits(bits)
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D tensor of integer codes in [0, 2**bits) into a uint8 tensor.

    ``bits`` must be 1, 2, 4 or 8. Returns ceil(len(codes) * bits / 8) bytes on the
    device of ``codes``. Raises ValueError for codes out of range.
    """
    _check_bits(bits)
    if codes.dim() != 1:
        raise ValueError(f"codes must be 1-D, got shape {tuple(codes.shape)}")
    if codes.dtype == torch.bool:
        codes = codes.to(torch.uint8)
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.clone()
    per_byte = 8 // bits
    pad = (-codes.numel()) % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    # The shifted codes occupy disjoint bits, so a sum is a bitwise OR (no carries).
    return (codes.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_bits`: returns the first ``count`` codes as int64."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed must be a 1-D uint8 tensor")
    if packed.numel() != packed_nbytes(count, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {count} codes of {bits} bits")
    if bits == 8:
        return packed.to(torch.int64)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed.view(-1, 1) >> shifts) & mask
    return codes.reshape(-1)[:count].to(torch.int64)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack the signs of ``x`` (flattened) at 1 bit each: bit 1 means ``x >= 0``.

    Zeros count as positive (+1) and NaN as negative (-1), so every value gets a sign
    and the majority vote never sees a zero.
    """
    return pack_bits((x.reshape(-1) >= 0).to(torch.uint8), 1)


def unpack_signs(
    packed: torch.Tensor, count: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: a 1-D tensor of ``count`` values in {-1, +1}."""
    return unpack_bits(packed, 1, count).to(dtype) * 2 - 1


def _check_bits(bits: int) -> None:
    if bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
