"""Between continents: N partners on capped links with latency, tapestry against stock hivemind, every figure from one
run.

Each partner runs in its own network namespace behind a switch (scripts/netlab.py), on a link capped at `--rate` in
both directions, with a round-trip time of each of `--rtt` (a relay of ours adds the delay: netem does not exist on
our machines); the bootstrap node sits on the switch. For each RTT and configuration the same model, data, H and
number of rounds run through:
- `tapestry join` with `--compression none | 8bit | 4bit` (error feedback on for the lossy codecs), blocking
  (`--no-overlap`) and overlapped (`--overlap`);
- stock hivemind (`scripts/hivemind_partner.py`): DecentralizedAverager with Float16Compression (OpenDiLoCo's
  setting) and with BlockwiseQuantization (its 8-bit codec).
Reported per configuration: bytes on each partner's link per round (rounds 2..R) from the kernel's counters
(payload, matchmaking, DHT, framing: everything), all-reduce seconds against the butterfly bound
2(N-1)/N x payload / rate, compute utilization (inner-step seconds over wall seconds), tokens per second per partner
(these over rounds 2..R-1), the last round's training loss, the share of rounds in which every partner averaged
together, and the share in which every partner ended the round on one model (by hash).

Run as root, from the repository root (it creates namespaces in 10.78.0.0/24 and deletes them after):
    sudo .venv/bin/python scripts/wan_bench.py --partners 4 --rate 20mbit --rtt 0 150 300 --rounds 6
Prints a Markdown table for BENCHMARKS.md; the runs' logs and metrics stay in the printed folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from tapestry_p2p.p2p import hivemind_compat  # (imports neither hivemind nor bitsandbytes)

hivemind_compat.install("main")  # first: their import-time warnings stay off the terminal

import torch  # noqa: E402
from hivemind.compression import BlockwiseQuantization, CompressionInfo, Float16Compression  # noqa: E402

from tapestry_p2p.comm.codec import compression_for  # noqa: E402
from tapestry_p2p.node.metrics import read_jsonl  # noqa: E402
from tapestry_p2p.testing.local_swarm import LocalSwarm, wait_for_file  # noqa: E402
from tapestry_p2p.training.model import ModelConfig, build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netlab import Lab  # noqa: E402 (a sibling script)

HIVEMIND_PARTNER = str(Path(__file__).resolve().parent / "hivemind_partner.py")
CORPUS = Path(__file__).resolve().parent.parent / "tapestry_p2p" / "app" / "corpus"
LANGUAGES = ("en", "es", "de", "en")
CONFIGS = {  # name: (system, codec, extra flags)
    "tapestry none": ("tapestry", "none", ("--no-overlap",)),
    "tapestry 8bit": ("tapestry", "8bit", ("--no-overlap",)),
    "tapestry 4bit": ("tapestry", "4bit", ("--no-overlap",)),
    "tapestry 8bit overlap": ("tapestry", "8bit", ("--overlap",)),
    "tapestry 4bit overlap": ("tapestry", "4bit", ("--overlap",)),
    "hivemind fp16": ("hivemind", "fp16", ()),
    "hivemind 8bit": ("hivemind", "8bit", ()),
}


@dataclass
class Result:
    name: str
    wire: float  # bytes per steady-state round on a partner's link (mean over partners)
    payload: float  # the codec's all-reduce payload per partner and round, 2(N-1)/N x the coded model
    allreduce: float  # seconds from the group's forming to our last averaged part, mean over partners and rounds
    reports: float  # seconds after it, until the round is settled (serving our span, loss reports), mean likewise
    bound: float  # butterfly bound, seconds
    utilization: float
    tokens_per_second: float
    loss: float
    round_seconds: float
    full_groups: float  # share of rounds in which every partner averaged together
    one_model: float  # share of rounds after which every partner held the same model
    idle: tuple[float, float]  # bytes per second a partner sends, and both ways, while it trains between all-reduces


def rate_bytes(rate: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", rate)
    if not match:
        raise SystemExit(f"--rate {rate!r}: write it as tc does, e.g. 20mbit")
    return float(match[1]) * {"k": 1e3, "m": 1e6, "g": 1e9}[match[2]] / 8


def coded_bytes(system: str, codec: str, params: int) -> float:
    """Bytes of the whole model's pseudo-gradient under a codec (its own estimate, which is exact up to headers)."""
    probe = torch.zeros(1 << 20)
    compression = (
        compression_for(codec)
        if system == "tapestry"
        else {"fp16": Float16Compression(), "8bit": BlockwiseQuantization()}[codec]
    )
    return params * 4 * compression.estimate_compression_ratio(CompressionInfo.from_tensor(probe))


def run_config(lab: Lab, name: str, args: argparse.Namespace, workdir: Path, params: int) -> Result:
    system, codec, extra = CONFIGS[name]
    run = workdir / name.replace(" ", "-")
    run.mkdir()
    program = ("-m", "tapestry_p2p") if system == "tapestry" else (HIVEMIND_PARTNER,)
    model = ["--n-layer", str(args.n_layer), "--n-head", str(args.n_head), "--n-embd", str(args.n_embd)]
    common = ["--inner-steps", str(args.inner_steps), "--max-rounds", str(args.rounds), "--threads", "1"]
    common += ["--batch-size", str(args.batch_size), "--compression", codec, *model, *extra]
    if system == "tapestry":
        common += ["--run-id", "wan", "--round-window", str(args.round_window), "--min-peers", str(lab.partners)]
    else:
        common += ["--run-id", "wan", "--group-size", str(lab.partners)]
    samples: list[dict[int, int]] = [{} for _ in range(lab.partners)]
    # (time, link bytes both ways, bytes sent) every second
    series: list[list[tuple[float, int, int]]] = [[] for _ in range(lab.partners)]
    with LocalSwarm(run, stop_grace=60) as swarm:
        boot_args = ["bootstrap", "--listen", f"/ip4/{lab.switch_address}/tcp/0", "--addr-file", str(run / "boot.addr")]
        if system == "tapestry":
            boot_args += ["--identity", str(run / "boot.key")]
        boot = swarm.start("boot", *boot_args, prefix=lab.prefix(None), program=program)
        address = wait_for_file(run / "boot.addr", 120, boot, swarm.log_path("boot")).split()[0]
        partners = [
            swarm.start(
                f"p{i}",
                "join",
                *common,
                "--initial-peers",
                address,
                "--listen",
                f"/ip4/{lab.address(i)}/tcp/0",
                "--data",
                str(CORPUS / f"{LANGUAGES[i % len(LANGUAGES)]}.txt"),
                "--metrics",
                str(run / f"p{i}.jsonl"),
                prefix=lab.prefix(i),
                program=program,
            )
            for i in range(lab.partners)
        ]
        while any(p.poll() is None for p in partners):  # sample each link's counters as each round completes
            for i in range(lab.partners):
                done = len(read_jsonl(run / f"p{i}.jsonl"))
                if done not in samples[i]:
                    samples[i][done] = lab.counters(i)
                if not series[i] or time.time() - series[i][-1][0] >= 1.0:
                    series[i].append((time.time(), lab.counters(i), lab.counters(i, ("tx_bytes",))))
            time.sleep(0.05)
        for i in range(lab.partners):
            samples[i].setdefault(len(read_jsonl(run / f"p{i}.jsonl")), lab.counters(i))
    (run / "counters.json").write_text(json.dumps({"after_round": samples, "every_second": series}))
    records = [read_jsonl(run / f"p{i}.jsonl") for i in range(lab.partners)]
    if any(len(r) != args.rounds for r in records):
        raise SystemExit(f"{name}: a partner did not finish {args.rounds} rounds; see {run}")
    # Time figures over the steady rounds: not the first (start-up, DHT join), not the last (with --overlap it
    # settles after the loop ends, with no compute left to overlap)
    later = [r[1:-1] if len(r) > 2 else r[1:] for r in records]
    rows = [row for rows in later for row in rows]
    n = lab.partners
    payload = 2 * (n - 1) / n * coded_bytes(system, codec, params)
    tokens = args.batch_size * ModelConfig().block_size
    wall = [sum(row["round_seconds"] for row in rows_i) for rows_i in later]
    compute = [sum(row["compute_seconds"] for row in rows_i) for rows_i in later]
    steps = [sum(row["inner_steps"] for row in rows_i) for rows_i in later]
    return Result(
        name=name,
        wire=mean((s[args.rounds] - s[1]) / (args.rounds - 1) for s in samples),
        payload=payload,
        allreduce=mean(row["allreduce_seconds"] for row in rows),
        reports=mean(row.get("seconds", {}).get("reports", 0.0) for row in rows),
        bound=payload / rate_bytes(args.rate),
        utilization=mean(c / w for c, w in zip(compute, wall, strict=True)),
        tokens_per_second=mean(k * tokens / w for k, w in zip(steps, wall, strict=True)),
        # (each partner's last loss: a blocking round can have no inner step, and then no loss)
        loss=mean(next(x["loss"] for x in reversed(r) if x["loss"] is not None) for r in records),
        round_seconds=mean(row["round_seconds"] for row in rows),
        idle=idle_rates(records, series) if "--overlap" not in extra else (float("nan"), float("nan")),
        full_groups=mean(row["group_size"] == n for row in rows),
        one_model=one_model(records),
    )


def one_model(records: list[list[dict]]) -> float:
    """The share of rounds (1..R) after which every partner's shared model had the same hash."""
    by_round: dict[int, set[str]] = {}
    for rows in records:
        for row in rows:
            by_round.setdefault(row["round"], set()).add(row["model_hash"])
    return mean(len(hashes) == 1 for hashes in by_round.values())


def idle_rates(records: list[list[dict]], series: list[list[tuple[float, int, int]]]) -> tuple[float, float]:
    """(sent, both ways): link bytes per second while partners train between two all-reduces (blocking rounds), from
    a second after a round's end until a second before the next round's inner steps end. DHT polls of the meeting
    time, status records and state declarations; no payload."""
    sent, both = [], []
    for rows, points in zip(records, series, strict=True):
        for ended, following in zip(rows[1:-1], rows[2:], strict=False):
            start, stop = ended["time"] + 1.0, ended["time"] + following["compute_seconds"] - 1.0
            inside = [point for point in points if start <= point[0] <= stop]
            if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
                seconds = inside[-1][0] - inside[0][0]
                both.append((inside[-1][1] - inside[0][1]) / seconds)
                sent.append((inside[-1][2] - inside[0][2]) / seconds)
    return (mean(sent), mean(both)) if sent else (float("nan"), float("nan"))


def report(results: list[Result], args: argparse.Namespace, params: int, rtt: float) -> None:
    base = next((r for r in results if r.name == "tapestry none"), None)
    print(
        f"\n{args.partners} partners, {args.rate} per link (each direction), RTT {rtt:.0f} ms, "
        f"{params / 1e6:.1f}M parameters, H = {args.inner_steps}, batch {args.batch_size}, {args.rounds} rounds "
        "(the first excluded)\n"
    )
    print(
        "| configuration | wire / round / partner | vs tapestry fp32 | beyond payload* | idle: sent / both ways** "
        "| all-reduce | then: reports*** "
        "| butterfly bound | of bound | compute utilization | tokens/s/partner | last loss | full groups | one model |"
    )
    print("|---" * 14 + "|")
    for r in results:
        ratio = f"{r.wire / base.wire:.3f}x" if base else "n/a"
        beyond = (r.wire - 2 * r.payload) / r.wire  # the payload crosses the link both ways
        print(
            f"| {r.name} | {r.wire / 1e6:.2f} MB | {ratio} | {beyond:.1%} "
            f"| {r.idle[0] / 1e3:.1f} / {r.idle[1] / 1e3:.1f} KB/s "
            f"| {r.allreduce:.1f} s | {r.reports:.1f} s | {r.bound:.1f} s | {r.bound / max(r.allreduce, 1e-9):.0%} "
            f"| {r.utilization:.0%} "
            f"| {r.tokens_per_second:.0f} | {r.loss:.3f} | {r.full_groups:.0%} | {r.one_model:.0%} |"
        )
    print(
        "\n*beyond payload: share of the link's bytes that are not the codec's all-reduce payload (TCP/IP, TLS and "
        "yamux framing, matchmaking, DHT)\n**idle: bytes per second a partner sends, and "
        "exchanges both ways, while it trains between all-reduces (blocking rounds only)\n***then: from our last "
        "averaged part until the round is settled (serving our span to groupmates still reading it, the loss reports "
        "that agree the next meeting); stock hivemind has no such step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partners", type=int, default=3, choices=[2, 3, 4])
    parser.add_argument("--rate", default="20mbit")
    parser.add_argument("--rtt", type=float, nargs="+", default=[0.0], help="round-trip times to run, in ms")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner-steps", type=int, default=8)
    parser.add_argument("--round-window", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark creates network namespaces")
    # stopped by a signal (even from a background shell, which ignores SIGINT): stop the swarm, delete the namespaces
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    config = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    params = sum(p.numel() for p in build_model(config, 0).parameters())
    workdir = Path(tempfile.mkdtemp(prefix="tapestry-wan-"))
    print(f"runs in {workdir}", flush=True)
    for rtt in args.rtt:
        lab = Lab(f"w{os.getpid() % 10000}", args.partners, args.rate, rtt)
        results = []
        try:
            lab.create()
            for name in args.configs:
                run = workdir / f"rtt{rtt:.0f}"
                run.mkdir(exist_ok=True)
                results.append(run_config(lab, name, args, run, params))
                print(f"RTT {rtt:.0f} ms, {name}: done", flush=True)
        finally:
            lab.delete()
        report(results, args, params, rtt)


if __name__ == "__main__":
    main()
