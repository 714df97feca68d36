"""The 8-bit wire codec (comm/codec.py): error bound, wire size, corrupt input."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import CompressionInfo

from tapestry_p2p.comm.codec import BLOCK_SIZE, Blockwise8Bit, compression_for, max_relative_error


def roundtrip(tensor: torch.Tensor) -> torch.Tensor:
    codec = Blockwise8Bit()
    return codec.extract(codec.compress(tensor, CompressionInfo.from_tensor(tensor)))


def test_8bit_roundtrip_error_is_within_the_blockwise_bound():
    x = torch.randn(10 * BLOCK_SIZE + 17) * torch.linspace(0.01, 10, 10 * BLOCK_SIZE + 17)
    y = roundtrip(x)
    for start in range(0, len(x), BLOCK_SIZE):
        block = slice(start, start + BLOCK_SIZE)
        assert (y[block] - x[block]).abs().max() <= max_relative_error() * x[block].abs().max() + 1e-12
    assert torch.equal(roundtrip(x), y)  # deterministic
    assert max_relative_error() < 0.02


def test_8bit_wire_size_and_corrupt_input():
    x = torch.randn(4096)
    message = Blockwise8Bit().compress(x, CompressionInfo.from_tensor(x))
    assert len(message.buffer) == 4096 + 4 * 4
    message.buffer = message.buffer[:-1]
    with pytest.raises(ValueError, match="expected"):
        Blockwise8Bit().extract(message)
    with pytest.raises(ValueError, match="one of"):
        compression_for("3bit")
