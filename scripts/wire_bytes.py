"""Bytes on the wire per outer round, control traffic included: 8-bit against float32, measured in one run.

Two partners in two network namespaces that this script creates, joined by one veth pair (capped with `tc tbf`).
The bootstrap node and partner A live in namespace A, partner B in namespace B, so every byte B exchanges with the
swarm (payload, matchmaking, DHT, libp2p and TLS framing) crosses the veth and shows in its counters. The
averager's own count of all-reduce payload is in B's metrics; the difference is control traffic.

Run as root (it creates namespaces), from the repository root:
    sudo .venv/bin/python scripts/wire_bytes.py --rounds 6 --rate 100mbit
It prints a Markdown table for BENCHMARKS.md. Only addresses inside its own namespaces (10.77.0.0/24) are used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

SUBNET = "10.77.0"
MODEL = ["--n-layer", "4", "--n-embd", "128", "--n-head", "4"]


def sh(*args: str) -> None:
    subprocess.run(args, check=True)


@dataclass
class Namespaces:
    a: str
    b: str
    rate: str

    def create(self) -> None:
        for ns in (self.a, self.b):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "tapveth-a", "type", "veth", "peer", "name", "tapveth-b")
        for ns, dev, host in ((self.a, "tapveth-a", 1), (self.b, "tapveth-b", 2)):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{host}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "mtu", "1500", "up")
            # burst above the MTU, or TCP stalls under tbf
            sh(
                "ip",
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                self.rate,
                "burst",
                "64kb",
                "latency",
                "400ms",
            )

    def delete(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)

    def counters(self) -> int:
        """tx + rx bytes of partner B's side of the link."""
        total = 0
        for direction in ("tx_bytes", "rx_bytes"):
            out = subprocess.run(
                ["ip", "netns", "exec", self.b, "cat", f"/sys/class/net/tapveth-b/statistics/{direction}"],
                check=True,
                capture_output=True,
                text=True,
            )
            total += int(out.stdout)
        return total


def spawn(ns: str, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tapestry_p2p", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def records(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def measure(nets: Namespaces, compression: str, rounds: int, workdir: Path) -> Dict[str, float]:
    """Run one swarm of two partners; return B's payload and wire bytes per round (after the first round)."""
    run = workdir / compression
    run.mkdir()
    addr_file = run / "boot.addr"
    procs = [
        spawn(
            nets.a,
            run / "boot.log",
            "bootstrap",
            "--listen",
            f"/ip4/{SUBNET}.1/tcp/0",
            "--identity",
            str(run / "boot.key"),
            "--addr-file",
            str(addr_file),
        )
    ]
    try:
        while not addr_file.exists():
            time.sleep(0.2)
        boot = addr_file.read_text().split()[0]
        common = [
            "--initial-peers",
            boot,
            "--run-id",
            f"wire-{compression}",
            "--compression",
            compression,
            "--inner-steps",
            "20",
            "--max-rounds",
            str(rounds),
            "--threads",
            "1",
            "--round-window",
            "3",
            *MODEL,
        ]
        text = Path(__file__).resolve().parent.parent / "tapestry_p2p" / "corpus"
        procs.append(
            spawn(
                nets.a,
                run / "a.log",
                "join",
                *common,
                "--listen",
                f"/ip4/{SUBNET}.1/tcp/0",
                "--data",
                str(text / "en.txt"),
                "--metrics",
                str(run / "a.jsonl"),
            )
        )
        procs.append(
            spawn(
                nets.b,
                run / "b.log",
                "join",
                *common,
                "--listen",
                f"/ip4/{SUBNET}.2/tcp/0",
                "--data",
                str(text / "es.txt"),
                "--metrics",
                str(run / "b.jsonl"),
            )
        )
        at_round: Dict[int, int] = {}
        while procs[2].poll() is None:  # sample B's link counters whenever a round completes
            done = len(records(run / "b.jsonl"))
            if done and done not in at_round:
                at_round[done] = nets.counters()
            time.sleep(0.05)
        at_round.setdefault(len(records(run / "b.jsonl")), nets.counters())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    b = records(run / "b.jsonl")
    if len(b) != rounds or any(r["group_size"] != 2 for r in b):
        raise SystemExit(f"{compression}: expected {rounds} rounds of 2 peers, got {[r['group_size'] for r in b]}")
    later = b[1:]
    payload = sum(r["bytes_sent"] + r["bytes_received"] for r in later) / len(later)
    wire = (at_round[rounds] - at_round[1]) / (rounds - 1)
    return {"payload": payload, "wire": wire, "seconds": sum(r["round_seconds"] for r in later) / len(later)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rate", default="100mbit", help="tc tbf rate of the link between the two partners")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark creates network namespaces")
    tag = f"tap{os.getpid()}"
    nets = Namespaces(f"{tag}a", f"{tag}b", args.rate)
    workdir = Path(tempfile.mkdtemp(prefix="tapestry-wire-"))
    try:
        nets.create()
        results = {c: measure(nets, c, args.rounds, workdir) for c in ("none", "8bit")}
    finally:
        nets.delete()
        shutil.rmtree(workdir, ignore_errors=True)
    base = results["none"]["wire"]
    print(
        f"two partners, {args.rate} link, model of 4 layers x 128 (0.8M params), {args.rounds} rounds, first excluded"
    )
    print("| compression | all-reduce payload / round | on the wire / round | control and framing | wire vs float32 |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        control = r["wire"] - r["payload"]
        print(
            f"| {name} | {r['payload'] / 1e6:.2f} MB | {r['wire'] / 1e6:.2f} MB | {control / 1e6:.2f} MB "
            f"({control / r['wire']:.0%}) | {r['wire'] / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
