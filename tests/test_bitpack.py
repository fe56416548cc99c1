"""Bit packing: exact round trips and exact byte counts."""

from __future__ import annotations

import math

import pytest
import torch

from strategies.bitpack import (
    VALID_BITS,
    pack_bits,
    pack_signs,
    packed_nbytes,
    unpack_bits,
    unpack_signs,
)

LENGTHS = [0, 1, 2, 3, 5, 7, 8, 9, 15, 17, 1001]


@pytest.mark.parametrize("bits", VALID_BITS)
@pytest.mark.parametrize("length", LENGTHS)
def test_round_trip_and_size(bits: int, length: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + length)
    codes = torch.randint(0, 1 << bits, (length,), generator=gen)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(length * bits / 8) == packed_nbytes(length, bits)
    out = unpack_bits(packed, bits, length)
    assert out.dtype == torch.int64
    assert torch.equal(out, codes)


def test_extreme_codes_survive() -> None:
    for bits in VALID_BITS:
        top = (1 << bits) - 1
        codes = torch.tensor([0, top] * 7 + [top])
        assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, codes.numel()), codes)


def test_known_layout_is_little_endian_within_a_byte() -> None:
    # 2-bit codes 1, 2, 3, 0 -> 0b00_11_10_01 = 57; the fifth code starts a new byte.
    packed = pack_bits(torch.tensor([1, 2, 3, 0, 1]), 2)
    assert packed.tolist() == [57, 1]
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [129, 1]


def test_two_bit_message_is_a_quarter_byte_per_value() -> None:
    d = 4096
    codes = torch.randint(0, 4, (d,))
    assert pack_bits(codes, 2).numel() == d // 4


def test_bool_codes_accepted_for_one_bit() -> None:
    flags = torch.tensor([True, False, True])
    assert unpack_bits(pack_bits(flags, 1), 1, 3).tolist() == [1, 0, 1]


def test_invalid_inputs_rejected() -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        pack_bits(torch.tensor([-1]), 1)
    with pytest.raises(TypeError):
        pack_bits(torch.tensor([0.5]), 2)
    with pytest.raises(ValueError, match="1-D"):
        pack_bits(torch.zeros(2, 2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 2, 5)


def test_signs_round_trip_with_zero_as_positive() -> None:
    x = torch.tensor([0.0, -0.0, -1.5, 2.0, -1e-30, 1e-30, float("nan"), 3.0, -4.0])
    signs = unpack_signs(pack_signs(x), x.numel())
    assert signs.tolist() == [1, 1, -1, 1, -1, 1, -1, 1, -1]
    assert signs.dtype == torch.float32
    assert pack_signs(x).numel() == 2


def test_signs_of_a_matrix_are_flattened() -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    expected = torch.where(x.reshape(-1) >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(pack_signs(x), 35), expected)
    assert pack_signs(x).numel() == 5
