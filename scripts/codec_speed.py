"""Encode + decode throughput of our 8-bit codec against hivemind's BlockwiseQuantization, in one run.

    .venv/bin/python scripts/codec_speed.py [--million-values 16] [--repeats 5]

Both run in this process on the same tensor; the best of `repeats` is reported (these machines are shared).
"""

from __future__ import annotations

import argparse
import time

import torch
from hivemind.compression import BlockwiseQuantization, CompressionInfo

from tapestry_p2p.comm.codec import Blockwise8Bit


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--million-values", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    x = torch.randn(args.million_values * 1_000_000)
    info = CompressionInfo.from_tensor(x)
    gb = x.numel() * 4 / 1e9
    rows = []
    for name, codec in (
        ("hivemind BlockwiseQuantization", BlockwiseQuantization()),
        ("tapestry Blockwise8Bit", Blockwise8Bit()),
    ):
        message = codec.compress(x, info)
        encode = best_seconds(lambda codec=codec: codec.compress(x, info), args.repeats)
        decode = best_seconds(lambda codec=codec, message=message: codec.extract(message), args.repeats)
        error = (codec.extract(message) - x).norm() / x.norm()
        rows.append((name, gb / encode, gb / decode, len(message.buffer), float(error)))
    base = rows[0]
    print(f"{args.million_values}M float32 values, {torch.get_num_threads()} torch threads, best of {args.repeats}")
    print("| codec | encode GB/s | decode GB/s | bytes on the wire | relative L2 error | encode vs hivemind |")
    print("|---|---|---|---|---|---|")
    for name, enc, dec, size, err in rows:
        print(f"| {name} | {enc:.2f} | {dec:.2f} | {size:,} | {err:.4f} | {enc / base[1]:.1f}x |")


if __name__ == "__main__":
    main()
