"""Wire codecs for parameter deltas: 8-bit and 4-bit blockwise quantization, registered with hivemind.

hivemind picks a codec by a fixed protobuf enum (`runtime_pb2.CompressionType`), so a new codec has to replace the
instance registered for an existing enum value. `register()` replaces BLOCKWISE_8BIT with `Blockwise8Bit` below:

- hivemind's own BlockwiseQuantization fails *silently* with numpy >= 2.4 (the reducer raises inside, `step()`
  returns as if all went well, and nothing is averaged);
- this one calls bitsandbytes directly on torch tensors (1.4x hivemind's encode and 1.6x its decode throughput in
  `scripts/codec_speed.py`, see BENCHMARKS.md), uses 1024-value blocks instead of 4096 (lower error), and leaves the
  1 KiB code book off the wire: both ends use bitsandbytes' fixed dynamic map.

`compression_for("8bit")` registers it (`hivemind_compat.register_compression`) before hivemind forks the averager
process that uses it, so both ends of every stream use the same format. bitsandbytes is imported here, eagerly, for the
same reason: imported lazily inside the averager process it stalls the first all-reduce for ~3 s (and its first
call, which imports torch's dynamo, is made at registration). A stock hivemind
peer would not understand the format; tapestry peers only average with tapestry peers.

Wire format of one 8-bit part: `absmax` (float32, one per block of BLOCK_SIZE values) followed by one uint8 code per
value. Tuning: a smaller block follows outliers better (relative error 1.1% at 256, 1.2% at 1024, 1.3% at 4096 on
Gaussian data) but spends 4 bytes per block on its scale; 1024 costs 0.4% of the payload.

`Blockwise4Bit` (`--compression 4bit`) is symmetric uniform 4-bit: per block of BLOCK_SIZE_4BIT values, one float32
scale `absmax` and 15 levels `k * absmax / 7`, k in -7..7, rounded to nearest (error at most absmax / 14 per value);
two codes per byte, the first value in the high nibble. It is plain torch arithmetic, not bitsandbytes' FP4/NF4: the
same wire size and error within 25% of NF4 (relative L2 error 11.7% against 9.6% on Gaussian data with 128-value
blocks), but bitsandbytes' CPU 4-bit encoder runs at ~0.1 GB/s where this one, which works through the tensor in
cache-sized chunks, encodes at ~1.5 and decodes at ~1 GB/s per core (scripts/codec_speed.py).
hivemind's `CompressionType` enum has no 4-bit member, so these parts travel under `UNIFORM_8BIT`, which tapestry does
not otherwise use (every peer of a run registers the same codec there). 128-value blocks cost 6% of the payload for
their scales (4.25 bits per value, 0.133x of float32); 64 would lower the error to 10.8% at 0.141x.

What a lossy codec drops from a partner's pseudo-gradient is not lost: error feedback (`comm/error_feedback.py`) adds
it to the partner's next one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, get_args

import numpy as np
import torch
from hivemind.compression import CompressionBase, CompressionInfo, Float16Compression, NoCompression
from hivemind.proto import runtime_pb2

from tapestry_p2p.p2p import hivemind_compat

with hivemind_compat.torch_compile_skipped():  # (its import compiles fallbacks we never call: see hivemind_compat)
    from bitsandbytes.functional import create_dynamic_map, dequantize_blockwise, quantize_blockwise

BLOCK_SIZE = 1024
BLOCK_SIZE_4BIT = 128
CHUNK_BLOCKS = 2048  # blocks per pass of the 4-bit codec: 1 MB of float32, fits a core's L2 cache (fastest tried)
LEVELS_4BIT = 7  # codes 1..15 stand for -7..7 steps of absmax / 7; code 0 (never produced) decodes to -8/7 absmax

Codec = Literal["8bit", "4bit", "fp16", "none"]
CODECS: tuple[Codec, ...] = get_args(Codec)
LOSSLESS: tuple[Codec, ...] = ("none",)


@functools.lru_cache(maxsize=1)
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' 256-entry signed dynamic code book (deterministic, identical on every peer)."""
    return create_dynamic_map(signed=True).float()


def max_relative_error(codec: Codec = "8bit") -> float:
    """Worst-case |x - decode(encode(x))| divided by the absmax of x's block (of the whole part for fp16 and none).

    8-bit: half the widest gap of the code book, plus 1% because bitsandbytes places its rounding thresholds slightly
    off the midpoints (measured: 0.2% over). 4-bit: half a step, plus float32 rounding of the scale."""
    if codec == "8bit":
        code = dynamic_map().sort().values
        return float((code[1:] - code[:-1]).max() / 2) * 1.01
    if codec == "4bit":
        return 0.5 / LEVELS_4BIT * 1.0001
    if codec == "fp16":
        return 2.0**-11
    return 0.0


class Blockwise8Bit(CompressionBase):
    """8-bit blockwise absmax quantization with bitsandbytes' dynamic map; replaces hivemind's BLOCKWISE_8BIT."""

    compression_type = runtime_pb2.BLOCKWISE_8BIT

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        flat = tensor.detach().to(torch.float32).reshape(-1).contiguous()
        codes, state = quantize_blockwise(flat, code=dynamic_map(), blocksize=BLOCK_SIZE)
        return _message(self.compression_type, tensor.shape, state.absmax.to(torch.float32), codes)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        _, absmax, codes = _split(serialized_tensor, BLOCK_SIZE, lambda blocks, n: n, "8-bit")
        values = dequantize_blockwise(codes, absmax=absmax, code=dynamic_map(), blocksize=BLOCK_SIZE)
        return values.reshape(tuple(serialized_tensor.size))

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return (1 + 4 / BLOCK_SIZE) / 4


class Blockwise4Bit(CompressionBase):
    """Symmetric uniform 4-bit blockwise quantization (see the module's docstring); sent under UNIFORM_8BIT."""

    compression_type = runtime_pb2.UNIFORM_8BIT

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        absmax, packed = encode_4bit(tensor.detach().to(torch.float32).reshape(-1))
        return _message(self.compression_type, tensor.shape, absmax, packed)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        numel, absmax, packed = _split(
            serialized_tensor, BLOCK_SIZE_4BIT, lambda blocks, n: blocks * BLOCK_SIZE_4BIT // 2, "4-bit"
        )
        return decode_4bit(absmax, packed)[:numel].reshape(tuple(serialized_tensor.size))

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return (0.5 + 4 / BLOCK_SIZE_4BIT) / 4


def _message(compression: int, shape: torch.Size, absmax: torch.Tensor, codes: torch.Tensor) -> runtime_pb2.Tensor:
    """A blockwise part on the wire: float32 scales, then the codes."""
    buffer = absmax.numpy().tobytes() + codes.numpy().tobytes()
    return runtime_pb2.Tensor(compression=compression, buffer=buffer, size=shape, dtype="float32", requires_grad=False)


def _split(
    message: runtime_pb2.Tensor, block: int, code_bytes: Callable[[int, int], int], codec: str
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(values, scales, codes) of a blockwise part from a peer, its length checked before anything is read;
    `code_bytes(blocks, values)` is how many code bytes the codec sends."""
    numel = int(np.prod(message.size, dtype=np.int64))
    num_blocks = -(-numel // block)
    expected = 4 * num_blocks + code_bytes(num_blocks, numel)
    if len(message.buffer) != expected:
        raise ValueError(f"{codec} part holds {len(message.buffer)} bytes, expected {expected}")
    absmax = torch.frombuffer(bytearray(message.buffer[: 4 * num_blocks]), dtype=torch.float32)
    codes = torch.frombuffer(bytearray(message.buffer[4 * num_blocks :]), dtype=torch.uint8)
    return numel, absmax, codes


@torch.no_grad()
def encode_4bit(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, packed codes) of a flat float32 tensor, padded with zeros to whole blocks. Works through
    CHUNK_BLOCKS blocks at a time, so that every pass over a chunk stays in the CPU's cache."""
    tail = -flat.numel() % BLOCK_SIZE_4BIT
    if tail:
        flat = torch.nn.functional.pad(flat, (0, tail))
    blocks = flat.view(-1, BLOCK_SIZE_4BIT)
    absmax = torch.empty(blocks.shape[0])
    packed = torch.empty(blocks.numel() // 2, dtype=torch.uint8)
    steps = torch.empty(min(CHUNK_BLOCKS, blocks.shape[0]), BLOCK_SIZE_4BIT)
    pairs = torch.empty(steps.numel() // 2)
    half = BLOCK_SIZE_4BIT // 2
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        chunk = blocks[start : start + CHUNK_BLOCKS]
        n = chunk.shape[0]
        scaled, amax = steps[:n], absmax[start : start + n]
        torch.amax(torch.abs(chunk, out=scaled), dim=1, out=amax)
        # a block of zeros (or of values so small that 7/absmax overflows) codes as zeros: 0 * finite scale
        torch.mul(chunk, (LEVELS_4BIT / amax.clamp_min(1e-30)).unsqueeze(1), out=scaled)
        scaled.round_().add_(LEVELS_4BIT + 1)  # codes 1..15, exact small integers in float32
        codes = scaled.view(-1, 2)
        # two codes per byte, the first in the high nibble: 16 * first + second, exact in float32
        torch.add(codes[:, 1], codes[:, 0], alpha=16, out=pairs[: n * half])
        packed[start * half : (start + n) * half].copy_(pairs[: n * half])
    return absmax, packed


@torch.no_grad()
def decode_4bit(absmax: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """The flat float32 values of `encode_4bit`'s output (including the padding), CHUNK_BLOCKS blocks at a time."""
    values = torch.empty(packed.numel() * 2)
    blocks = values.view(-1, BLOCK_SIZE_4BIT)
    codes = torch.empty(min(CHUNK_BLOCKS, blocks.shape[0]) * BLOCK_SIZE_4BIT // 2, 2, dtype=torch.uint8)
    scales = absmax / LEVELS_4BIT
    half = BLOCK_SIZE_4BIT // 2
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        chunk = blocks[start : start + CHUNK_BLOCKS]
        n = chunk.shape[0]
        part, pair = packed[start * half : (start + n) * half], codes[: n * half]
        torch.bitwise_right_shift(part, 4, out=pair[:, 0])
        torch.bitwise_and(part, 15, out=pair[:, 1])
        chunk.copy_(pair.view(n, BLOCK_SIZE_4BIT)).sub_(LEVELS_4BIT + 1).mul_(scales[start : start + n].unsqueeze(1))
    return values


def compression_for(name: str) -> CompressionBase:
    """The hivemind compression instance for a codec name (one of CODECS)."""
    if name == "8bit":
        return _registered_8bit()
    if name == "4bit":
        return _registered_4bit()
    if name == "fp16":
        return Float16Compression()
    if name == "none":
        return NoCompression()
    raise ValueError(f"unknown compression {name!r}: use one of {', '.join(CODECS)}")


@functools.cache
def _registered_8bit() -> CompressionBase:
    """Our 8-bit codec, registered in place of hivemind's BLOCKWISE_8BIT in this process and its later forks. It codes
    one block here: bitsandbytes' kernels import torch's dynamo at their first call (~1 s), which would otherwise
    stall the averager process's first all-reduce."""
    codec = Blockwise8Bit()
    block = torch.zeros(BLOCK_SIZE)
    codec.extract(codec.compress(block, CompressionInfo.from_tensor(block)))
    return hivemind_compat.register_compression("BLOCKWISE_8BIT", codec)


@functools.cache
def _registered_4bit() -> CompressionBase:
    """Our 4-bit codec, registered in place of hivemind's UNIFORM_8BIT in this process and its later forks."""
    return hivemind_compat.register_compression("UNIFORM_8BIT", Blockwise4Bit())
