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
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tapestry_p2p.node.metrics import read_jsonl
from tapestry_p2p.testing.local_swarm import LocalSwarm, wait_for_file

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


def measure(nets: Namespaces, compression: str, rounds: int, workdir: Path) -> dict[str, float]:
    """Run one swarm of two partners; return B's payload and wire bytes per round (after the first round)."""
    run = workdir / compression
    run.mkdir()
    in_a, in_b = ("ip", "netns", "exec", nets.a), ("ip", "netns", "exec", nets.b)
    text = Path(__file__).resolve().parent.parent / "tapestry_p2p" / "app" / "corpus"
    with LocalSwarm(run, stop_grace=30) as swarm:
        boot_args = ["bootstrap", "--listen", f"/ip4/{SUBNET}.1/tcp/0", "--identity", str(run / "boot.key")]
        boot = swarm.start("boot", *boot_args, "--addr-file", str(run / "boot.addr"), prefix=in_a)
        address = wait_for_file(run / "boot.addr", 120, boot, swarm.log_path("boot")).split()[0]
        common = [
            "join",
            "--initial-peers",
            address,
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
        for name, host, prefix, language in (("a", 1, in_a, "en"), ("b", 2, in_b, "es")):
            swarm.start(
                name,
                *common,
                "--listen",
                f"/ip4/{SUBNET}.{host}/tcp/0",
                "--data",
                str(text / f"{language}.txt"),
                "--metrics",
                str(run / f"{name}.jsonl"),
                prefix=prefix,
            )
        at_round: dict[int, int] = {}
        while swarm.started[2].poll() is None:  # sample B's link counters whenever a round completes
            done = len(read_jsonl(run / "b.jsonl"))
            if done and done not in at_round:
                at_round[done] = nets.counters()
            time.sleep(0.05)
        at_round.setdefault(len(read_jsonl(run / "b.jsonl")), nets.counters())
    b = read_jsonl(run / "b.jsonl")
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
