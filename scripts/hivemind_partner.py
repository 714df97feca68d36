"""A DiLoCo partner that averages with stock hivemind: the baseline of scripts/wan_bench.py.

The same model, data, inner AdamW and outer Nesterov step as `tapestry join` (tapestry's own training modules), but
each round's pseudo-gradient is averaged by an unmodified `hivemind.averaging.DecentralizedAverager` with hivemind's
own matchmaking, as OpenDiLoCo does: `--compression fp16` (Float16Compression, OpenDiLoCo's setting) or `8bit`
(BlockwiseQuantization; it works with the numpy setup.cfg pins, < 2.4). No screening, no bit-exact results, no
state sync: only what the benchmark compares (bytes, time, loss). One JSON line per round in `--metrics`, with the
fields of tapestry's RoundMetrics that the benchmark reads.

    python scripts/hivemind_partner.py bootstrap --listen /ip4/IP/tcp/0 --addr-file FILE
    python scripts/hivemind_partner.py join --initial-peers ADDR --listen /ip4/IP/tcp/0 --data FILE ...
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import threading
import time
from pathlib import Path

from tapestry_p2p.p2p import hivemind_compat  # (imports neither hivemind nor bitsandbytes)

hivemind_compat.install("main")  # first: their import-time warnings stay off the terminal

import torch  # noqa: E402
from hivemind import DHT  # noqa: E402
from hivemind.averaging import DecentralizedAverager  # noqa: E402
from hivemind.averaging.control import AveragingStage  # noqa: E402
from hivemind.compression import BlockwiseQuantization, Float16Compression  # noqa: E402

from tapestry_p2p.node.config import run_seed  # noqa: E402
from tapestry_p2p.training.data import TokenStream  # noqa: E402
from tapestry_p2p.training.inner import InnerTrainer, TrainConfig  # noqa: E402
from tapestry_p2p.training.model import ModelConfig, build_model  # noqa: E402
from tapestry_p2p.training.outer import OuterConfig, SharedModel  # noqa: E402
from tapestry_p2p.training.tokenizer import ByteTokenizer  # noqa: E402

CODECS = {"fp16": Float16Compression, "8bit": BlockwiseQuantization}


def bootstrap(args: argparse.Namespace) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    dht = DHT(host_maddrs=[args.listen], start=True)
    Path(args.addr_file).write_text(" ".join(str(a) for a in dht.get_visible_maddrs()) + "\n")
    stop.wait()
    dht.shutdown()


def join(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model_config = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    shared = SharedModel(build_model(model_config, run_seed(args.run_id)), OuterConfig())
    working = build_model(model_config, run_seed(args.run_id))
    shared.copy_into(working)
    batches = TokenStream(Path(args.data), ByteTokenizer(), model_config.block_size, args.batch_size)
    trainer = InnerTrainer(working, batches, TrainConfig(batch_size=args.batch_size))
    dht = DHT(initial_peers=[args.initial_peers], host_maddrs=[args.listen], start=True)
    averager = DecentralizedAverager(
        [torch.zeros_like(p) for p in shared.params],
        dht,
        prefix=f"{args.run_id}_avg",
        target_group_size=args.group_size,
        min_group_size=2,
        min_matchmaking_time=args.matchmaking_time,
        request_timeout=1.0,
        allreduce_timeout=args.allreduce_timeout,
        compression=CODECS[args.compression](),
        start=True,
    )
    try:
        for round_no in range(1, args.max_rounds + 1):
            record = one_round(round_no, args, shared, trainer, averager)
            with open(args.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
    finally:
        averager.shutdown()
        dht.shutdown()


def one_round(
    round_no: int, args: argparse.Namespace, shared: SharedModel, trainer: InnerTrainer, averager: DecentralizedAverager
) -> dict:
    started = time.monotonic()
    losses = [trainer.step() for _ in range(args.inner_steps)]
    compute = time.monotonic() - started
    delta = shared.pseudo_gradient(trainer.model)
    with averager.get_tensors() as buffers:
        for buffer, d in zip(buffers, delta, strict=True):
            buffer.copy_(d)
    asked = time.monotonic()
    control = averager.step(wait=False, timeout=args.matchmaking_time + args.allreduce_timeout)
    allreduce_began = None
    while not control.done():  # the stage says when matchmaking ended and the all-reduce began
        if allreduce_began is None and control.stage in (AveragingStage.RUNNING_ALLREDUCE, AveragingStage.FINISHED):
            allreduce_began = time.monotonic()
        time.sleep(0.01)
    ended = time.monotonic()
    try:
        gathered = control.result()
    except Exception as e:  # noqa: BLE001 (a baseline: any failure means the round went alone)
        gathered, failure = None, f"{type(e).__name__}: {e}"
    else:
        failure = None if gathered else "no group"
    if gathered:
        with averager.get_tensors() as buffers:
            averaged = [b.clone() for b in buffers]
    else:
        averaged = delta
    shared.apply(averaged)
    shared.copy_into(trainer.model)
    began = allreduce_began if allreduce_began is not None else ended
    return dict(
        round=round_no,
        inner_steps=len(losses),
        loss=sum(losses) / len(losses) if all(map(math.isfinite, losses)) else None,
        group_size=len(gathered) if gathered else 1,
        round_seconds=round(time.monotonic() - started, 3),
        compute_seconds=round(compute, 3),
        wait_seconds=round(began - asked, 3),
        allreduce_seconds=round(ended - began, 3),
        bytes_sent=0,  # hivemind does not count them: the benchmark reads the kernel's counters
        bytes_received=0,
        model_hash=shared.hash(),
        failure=failure,
        time=time.time(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    boot = commands.add_parser("bootstrap")
    boot.add_argument("--listen", required=True)
    boot.add_argument("--addr-file", required=True)
    part = commands.add_parser("join")
    part.add_argument("--initial-peers", required=True)
    part.add_argument("--listen", required=True)
    part.add_argument("--data", required=True)
    part.add_argument("--metrics", required=True)
    part.add_argument("--run-id", default="hivemind-baseline")
    part.add_argument("--compression", choices=sorted(CODECS), default="fp16")
    part.add_argument("--group-size", type=int, default=3)
    part.add_argument("--inner-steps", type=int, default=10)
    part.add_argument("--max-rounds", type=int, default=4)
    part.add_argument("--batch-size", type=int, default=16)
    part.add_argument("--n-layer", type=int, default=4)
    part.add_argument("--n-head", type=int, default=4)
    part.add_argument("--n-embd", type=int, default=128)
    part.add_argument("--threads", type=int, default=1)
    part.add_argument("--matchmaking-time", type=float, default=5.0)
    part.add_argument("--allreduce-timeout", type=float, default=600.0)
    args = parser.parse_args()
    bootstrap(args) if args.command == "bootstrap" else join(args)


if __name__ == "__main__":
    main()
