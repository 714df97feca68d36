"""Encode and decode throughput per core of our codecs against hivemind's and bitsandbytes' 4-bit, in one run.

    .venv/bin/python scripts/codec_speed.py [--million-values 16] [--repeats 5] [--threads 1]

Every codec runs in this process on the same Gaussian tensor with `--threads` torch threads (1: per core); the best
of `repeats` is reported (these machines are shared). Baselines: hivemind's Float16Compression (OpenDiLoCo's setting)
and BlockwiseQuantization (its 8-bit codec), and bitsandbytes' NF4 (`quantize_4bit`, 64-value blocks) as the 4-bit
reference the issue names.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from tapestry_p2p.p2p import hivemind_compat  # (imports neither hivemind nor bitsandbytes)

hivemind_compat.install("main")  # first: their import-time warnings stay off the terminal

import torch  # noqa: E402
from bitsandbytes.functional import dequantize_4bit, quantize_4bit  # noqa: E402
from hivemind.compression import BlockwiseQuantization, CompressionInfo, Float16Compression  # noqa: E402

from tapestry_p2p.comm.codec import Blockwise4Bit, Blockwise8Bit  # noqa: E402


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def hivemind_style(codec: Any, x: torch.Tensor) -> tuple[Callable, Callable[[Any], torch.Tensor], Callable[[Any], int]]:
    info = CompressionInfo.from_tensor(x)
    return (lambda: codec.compress(x, info)), codec.extract, lambda message: len(message.buffer)


def bitsandbytes_nf4(x: torch.Tensor) -> tuple[Callable, Callable[[Any], torch.Tensor], Callable[[Any], int]]:
    def size(encoded: Any) -> int:
        codes, state = encoded
        return codes.numel() + 4 * state.absmax.numel()

    return (lambda: quantize_4bit(x, blocksize=64, quant_type="nf4")), (lambda e: dequantize_4bit(*e)), size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--million-values", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.million_values * 1_000_000, generator=torch.Generator().manual_seed(0))
    gb = x.numel() * 4 / 1e9
    codecs = {
        "hivemind Float16Compression": hivemind_style(Float16Compression(), x),
        "hivemind BlockwiseQuantization (8-bit)": hivemind_style(BlockwiseQuantization(), x),
        "bitsandbytes NF4 (4-bit, quantize_4bit)": bitsandbytes_nf4(x),
        "tapestry Blockwise8Bit (8bit)": hivemind_style(Blockwise8Bit(), x),
        "tapestry Blockwise4Bit (4bit)": hivemind_style(Blockwise4Bit(), x),
    }
    rows = []
    for name, (encode, decode, size) in codecs.items():
        encoded = encode()
        encode_s = best_seconds(encode, args.repeats)
        decode_s = best_seconds(lambda decode=decode, encoded=encoded: decode(encoded), args.repeats)
        error = (decode(encoded).reshape(-1) - x).norm() / x.norm()
        rows.append((name, gb / encode_s, gb / decode_s, size(encoded), float(error)))
    base = rows[1]
    print(f"{args.million_values}M float32 values, {args.threads} torch thread(s), best of {args.repeats}\n")
    print(
        "| codec | encode GB/s | decode GB/s | bytes on the wire | vs float32 | relative L2 error "
        "| encode vs hivemind 8-bit | decode vs hivemind 8-bit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, enc, dec, wire, err in rows:
        print(
            f"| {name} | {enc:.2f} | {dec:.2f} | {wire:,} | {wire / (4 * x.numel()):.3f}x | {err:.4f} "
            f"| {enc / base[1]:.2f}x | {dec / base[2]:.2f}x |"
        )


if __name__ == "__main__":
    main()
