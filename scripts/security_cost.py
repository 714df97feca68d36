"""What the protections of issue 8 cost in round time: the same small swarm, side by side, in three setups.

- `before`: the code before issue 8 (a checkout given with --baseline-src, e.g. a `git worktree` of 268839e), open;
- `open`: this checkout, open swarm (screening, clipping, election, deadlines, message caps; no membership);
- `consortium`: this checkout with a consortium file (adds the DHT authorizer, membership checks, signed meetings).

Each setup runs a bootstrap node and --partners `tapestry join` processes on loopback for --rounds rounds, one setup
after the other, --repeats times in alternation; the report is the median round time (all partners, rounds 2 and
later: round 1 includes start-up) and the ratio to `before`.

It also reports the study behind `--clip-multiple`: in each round, every partner's update norm divided by the lower
median of that round's norms (what the clip bound is a multiple of), over all rounds of the new code's setups. The
partners train on the demo's corpora (en, es, de), deliberately different data.

    git worktree add /tmp/before 268839e
    .venv/bin/python scripts/security_cost.py --baseline-src /tmp/before --rounds 8 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from tapestry_p2p.node.metrics import read_jsonl
from tapestry_p2p.security.consortium import Consortium, save
from tapestry_p2p.security.identity import load_or_create_identity, public_key_line, signing_key
from tapestry_p2p.testing.local_swarm import LOOPBACK, TINY_MODEL, LocalSwarm, wait_for_file

RUN = "cost"


def run_setup(
    workdir: Path, partners: int, rounds: int, src: Optional[str], consortium: bool
) -> tuple[list[float], list[float]]:
    """Round durations (seconds) of every partner's rounds 2..R, and each update's norm over its round's lower
    median (empty for code that does not record norms)."""
    env = {"PYTHONPATH": src} if src else None
    keys = {name: workdir / f"{name}.key" for name in ["boot", *[f"p{i}" for i in range(partners)]]}
    extra: dict[str, list[str]] = {name: [] for name in keys}
    if consortium:
        members = Consortium(RUN, 1)
        for name, path in keys.items():
            load_or_create_identity(path)
            members = members.with_member(name, public_key_line(path))
        for path in keys.values():
            members = members.signed_by(signing_key(path))
        save(members, workdir / "consortium.toml")
        extra = {
            name: ["--consortium", str(workdir / "consortium.toml"), "--identity", str(keys[name])] for name in keys
        }
    with LocalSwarm(workdir) as swarm:
        addr_file = workdir / "boot.addr"
        boot_args = ["bootstrap", "--listen", LOOPBACK, "--run-id", RUN, "--addr-file", str(addr_file)]
        boot_args += extra["boot"] or ["--identity", str(keys["boot"])]
        popen = swarm.start("boot", *boot_args, env=env)
        boot = wait_for_file(addr_file, 90, popen, swarm.log_path("boot")).split()[0]
        procs = []
        for i in range(partners):
            name = f"p{i}"
            (workdir / name).mkdir()
            data = Path(__file__).resolve().parents[1] / "tapestry_p2p" / "app" / "corpus"
            corpus = sorted(data.glob("*.txt"))[i % len(list(data.glob("*.txt")))]
            args = ["join", "--run-id", RUN, "--data", str(corpus), "--initial-peers", boot, "--listen", LOOPBACK]
            args += ["--max-rounds", str(rounds), "--inner-steps", "10", "--threads", "1", "--round-window", "3"]
            args += ["--metrics", str(workdir / name / "metrics.jsonl"), "--min-peers", str(partners), "--quiet"]
            procs.append(swarm.start(name, *args, *TINY_MODEL, *extra[name], env=env))
        deadline = time.monotonic() + 60 * rounds
        for popen in procs:
            popen.wait(timeout=max(1.0, deadline - time.monotonic()))
            if popen.returncode != 0:
                sys.exit(f"a partner failed; see {workdir}")
    records = [r for i in range(partners) for r in read_jsonl(workdir / f"p{i}" / "metrics.jsonl")]
    durations = [r["round_seconds"] for r in records if r["round"] > 1]
    by_round: dict[int, list[float]] = {}
    for r in records:
        if r.get("update_norm", 0.0) > 0 and r["group_size"] == partners:
            by_round.setdefault(r["round"], []).append(r["update_norm"])
    ratios = []
    for norms in by_round.values():
        if len(norms) == partners:
            ratios += [n / statistics.median_low(norms) for n in norms]
    return durations, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", help="a checkout of the code before issue 8 (omit to skip `before`)")
    parser.add_argument("--partners", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    setups = {"open": (None, False), "consortium": (None, True)}
    if args.baseline_src:
        setups = {"before": (args.baseline_src, False), **setups}
    found: dict[str, list[float]] = {name: [] for name in setups}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tapestry-cost-") as tmp:
        for repeat in range(args.repeats):
            for name, (src, consortium) in setups.items():
                workdir = Path(tmp) / f"{name}-{repeat}"
                workdir.mkdir()
                durations, norm_ratios = run_setup(workdir, args.partners, args.rounds, src, consortium)
                found[name] += durations
                ratios += norm_ratios
                print(f"{name} #{repeat + 1}: median {statistics.median(found[name]):.2f}s so far", flush=True)
    base = statistics.median(found["before" if "before" in found else "open"])
    print(f"\n| setup | rounds measured | median round (s) | ratio to {next(iter(found))} |")
    print("|---|---|---|---|")
    for name, durations in found.items():
        median = statistics.median(durations)
        print(f"| {name} | {len(durations)} | {median:.2f} | {median / base:.3f} |")
    if ratios:
        print(f"\nupdate norm / lower median of its round, {len(ratios)} updates: max {max(ratios):.2f}, ", end="")
        print(", ".join(f"above {k}: {sum(r > k for r in ratios)}" for k in (1.5, 2.0, 3.0)))


if __name__ == "__main__":
    main()
