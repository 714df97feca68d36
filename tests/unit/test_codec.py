"""The wire codecs (comm/codec.py): error bounds, wire sizes, corrupt input."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import CompressionInfo

from tapestry_p2p.comm.codec import BLOCK_SIZE, BLOCK_SIZE_4BIT, CHUNK_BLOCKS, compression_for, max_relative_error

BLOCKS = {"8bit": BLOCK_SIZE, "4bit": BLOCK_SIZE_4BIT}


def roundtrip(codec: str, tensor: torch.Tensor) -> torch.Tensor:
    compression = compression_for(codec)
    return compression.extract(compression.compress(tensor, CompressionInfo.from_tensor(tensor)))


@pytest.mark.parametrize("codec", ["8bit", "4bit"])
def test_roundtrip_error_is_within_the_blockwise_bound(codec):
    block = BLOCKS[codec]
    # a partial last block too; for 4-bit, more than two of the chunks it encodes at a time
    n = (10 if codec == "8bit" else 2 * CHUNK_BLOCKS + 10) * block + 17
    x = torch.randn(n) * torch.linspace(0.01, 10, n)
    x[3 * block : 4 * block] = 0  # a block of zeros decodes to zeros
    y = roundtrip(codec, x)
    assert y.shape == x.shape and y.dtype == torch.float32
    for start in range(0, n, block):
        values = slice(start, start + block)
        assert (y[values] - x[values]).abs().max() <= max_relative_error(codec) * x[values].abs().max() + 1e-12
    assert torch.equal(y[3 * block : 4 * block], torch.zeros(block))
    assert torch.equal(roundtrip(codec, x), y)  # deterministic
    assert max_relative_error(codec) < {"8bit": 0.02, "4bit": 0.072}[codec]


@pytest.mark.parametrize(
    "codec,size", [("8bit", 4096 + 4 * 4), ("4bit", 2048 + 4 * 32), ("fp16", 2 * 4096), ("none", 4 * 4096)]
)
def test_wire_size_and_corrupt_input(codec, size):
    x = torch.randn(4096)
    compression = compression_for(codec)
    message = compression.compress(x, CompressionInfo.from_tensor(x))
    assert len(message.buffer) == size
    if codec in BLOCKS:
        message.buffer = message.buffer[:-1]
        with pytest.raises(ValueError, match="expected"):
            compression.extract(message)


def test_an_unknown_codec_is_refused_by_name():
    with pytest.raises(ValueError, match="one of 8bit, 4bit, fp16, none"):
        compression_for("3bit")
