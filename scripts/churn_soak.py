"""Churn soak: N partners on loopback for M minutes while a driver kills, stops, restarts and adds partners at random.

What the driver does, every `--every` seconds (with jitter), picked at random:
- `kill`: SIGKILL a running partner (whatever it is doing: training, meeting, all-reduce); restart it later from its
  checkpoint directory and identity;
- `term`: SIGTERM a running partner (it checkpoints where it is, mid-round included); restart it later;
- `crash`: restart a stopped partner armed to SIGKILL itself in the middle of its next all-reduce
  (TAPESTRY_CRASH_IN_ALLREDUCE), so crashes mid-all-reduce happen on purpose, not only by luck of timing;
- `new`: start a brand-new partner (a late joiner, up to `--max-new` of them).
The last `--quiet-tail` seconds have no churn, so the run ends with the swarm settled; then every node gets SIGTERM.

Report (Markdown, printed and written to `--report`):
- rounds completed (per partner and in total), rounds alone, failed rounds grouped by reason, re-syncs;
- agreement: for every round, how many distinct shared models (hashes) the partners that averaged in it hold, and the
  largest parameter difference between partners' final checkpoints of the same round;
- lost progress: a restarted partner that resumes at an earlier round or step than its checkpoint held, or a swarm
  whose highest round goes backwards;
- leftover processes: every process ever seen under a node, still alive after the run.

Run from the repository root (2 cores: about `--minutes` + 1 minutes):
    .venv/bin/python scripts/churn_soak.py --peers 5 --minutes 10 --report docs/churn-soak.md
"""

from __future__ import annotations

import argparse
import itertools
import random
import re
import signal
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from tapestry_p2p.testing.faults import CRASH_ENV

from tapestry_p2p.node.metrics import read_jsonl
from tapestry_p2p.testing.local_swarm import LOOPBACK, TINY_MODEL, LocalSwarm

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tapestry_p2p" / "app" / "corpus"
LANGUAGES = ("en", "es", "de")
RUN_ID = "soak"
STOP_GRACE = 60.0  # seconds a partner gets to checkpoint and exit after SIGTERM
RESUMED = re.compile(r"resumed from \S+ at round (\d+), step (\d+)")


@dataclass
class Partner:
    name: str
    language: str
    folder: Path
    popen: Optional[subprocess.Popen] = None
    sessions: int = 0
    expected: Optional[tuple] = None  # (round, step) its checkpoint held when it was restarted

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def session_name(self) -> str:
        return f"{self.name}/session{self.sessions}"


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.workdir = args, workdir
        self.rng = random.Random(args.seed)
        self.swarm = LocalSwarm(workdir, stop_grace=STOP_GRACE)
        self.partners: list[Partner] = []
        self.boot_addrs: list[str] = []
        self.events: list[str] = []
        self.lost: list[str] = []
        self.leftover_processes: list[str] = []
        self.started = time.monotonic()
        self.new_partners = 0

    # ---- processes ----

    def start_bootstraps(self, count: int) -> None:
        for i in range(count):
            self.boot_addrs.append(self.swarm.start_bootstrap(f"boot{i}", run_id=RUN_ID, timeout=120))

    def add_partner(self) -> Partner:
        index = len(self.partners)
        partner = Partner(f"p{index}", LANGUAGES[index % len(LANGUAGES)], self.workdir / f"p{index}")
        partner.folder.mkdir()
        self.partners.append(partner)
        self.start(partner)
        return partner

    def start(self, partner: Partner, crash_in_allreduce: Optional[int] = None) -> None:
        state = partner.folder / "ckpt" / "state.pt"
        if state.exists():
            saved = torch.load(state, weights_only=True)
            partner.expected = (saved["outer"]["round"], saved["inner"]["steps"])
        partner.sessions += 1
        args = [
            "join",
            "--initial-peers",
            *self.boot_addrs,
            "--run-id",
            RUN_ID,
            "--partner",
            partner.name,
            "--data",
            str(CORPUS / f"{partner.language}.txt"),
            "--listen",
            LOOPBACK,
            "--identity",
            str(partner.folder / "identity.key"),
            "--checkpoint-dir",
            str(partner.folder / "ckpt"),
            "--metrics",
            str(partner.folder / "metrics.jsonl"),
            "--inner-steps",
            str(self.args.inner_steps),
            "--round-window",
            "3",
            "--threads",
            "1",
            "--quiet",
            *TINY_MODEL,
        ]
        env = {CRASH_ENV: str(crash_in_allreduce)} if crash_in_allreduce else None
        partner.popen = self.swarm.start(partner.session_name, *args, env=env)
        self.note(f"start {partner.name} (session {partner.sessions}" + (", armed to crash" if env else "") + ")")

    def track_descendants(self) -> None:
        for popen in self.swarm.started:
            if popen.poll() is None:
                self.swarm.remember_children(popen)

    def note(self, text: str) -> None:
        line = f"{time.monotonic() - self.started:7.1f}s  {text}"
        self.events.append(line)
        print(line, flush=True)

    # ---- the driver ----

    def churn_once(self) -> None:
        running = [p for p in self.partners if p.running]
        stopped = [p for p in self.partners if not p.running]
        actions = []
        if len(running) > 2:
            actions += ["kill", "term"]
        if stopped:
            actions += ["restart", "crash"]
        if self.new_partners < self.args.max_new:
            actions.append("new")
        action = self.rng.choice(actions)
        if action in ("kill", "term"):
            victim = self.rng.choice(running)
            self.track_descendants()
            victim.popen.send_signal(signal.SIGKILL if action == "kill" else signal.SIGTERM)
            self.note(f"{action} {victim.name}")
        elif action in ("restart", "crash"):
            partner = self.rng.choice(stopped)
            self.check_resume_of_last_session(partner)
            self.start(partner, crash_in_allreduce=self.rng.randint(1, 3) if action == "crash" else None)
        else:
            self.new_partners += 1
            self.note(f"new partner {self.add_partner().name}")

    def check_resume_of_last_session(self, partner: Partner) -> None:
        """A session that resumed from a checkpoint must have started exactly where that checkpoint was."""
        if partner.expected is None or partner.sessions < 2:
            return
        log = self.swarm.log(partner.session_name)
        found = RESUMED.search(log)
        if found is None:
            self.lost.append(f"{partner.name} session {partner.sessions}: did not resume from its checkpoint")
        elif (int(found.group(1)), int(found.group(2))) < partner.expected:
            resumed = (int(found.group(1)), int(found.group(2)))
            self.lost.append(f"{partner.name} session {partner.sessions}: resumed at {resumed}, had {partner.expected}")

    def run(self) -> None:
        self.start_bootstraps(2)
        for _ in range(self.args.peers):
            self.add_partner()
        end = self.started + 60 * self.args.minutes
        churn_until = end - self.args.quiet_tail
        next_event = time.monotonic() + 45  # let the swarm form first
        while time.monotonic() < end:
            self.track_descendants()
            if time.monotonic() >= next_event and time.monotonic() < churn_until:
                self.churn_once()
                next_event = time.monotonic() + self.args.every * self.rng.uniform(0.5, 1.5)
            if time.monotonic() >= churn_until:  # settle: bring every stopped partner back
                for partner in self.partners:
                    if not partner.running and partner.sessions and time.monotonic() < end - 60:
                        self.check_resume_of_last_session(partner)
                        self.start(partner)
            time.sleep(1.0)
        self.stop_all()

    def stop_all(self) -> None:
        """SIGTERM every process (partners checkpoint and exit); note any that had to be killed."""
        self.track_descendants()
        self.leftover_processes = [f"{p.pid} {p.name()}" for p in self._stop_and_find_leftovers()]
        for partner in self.partners:
            self.check_resume_of_last_session(partner)

    def _stop_and_find_leftovers(self) -> list:
        for popen in self.swarm.stop_all():
            name = next((p.name for p in self.partners if p.popen is popen), "a bootstrap node")
            self.note(f"{name} did not stop within {STOP_GRACE:.0f}s of SIGTERM: killed")
        time.sleep(3)
        return self.swarm.leftovers()


def report(soak: Soak) -> str:
    """The Markdown report of a finished soak."""
    records = {p.name: read_jsonl(p.folder / "metrics.jsonl") for p in soak.partners}
    all_records = [r for rs in records.values() for r in rs]
    failures = Counter(_reason(r["failure"]) for r in all_records if r["failure"])
    by_round: dict[int, set] = defaultdict(set)
    for r in all_records:
        if r["group_size"] > 1:
            by_round[r["round"]].add(r["model_hash"])
    disagreeing = {rnd: len(h) for rnd, h in by_round.items() if len(h) > 1}
    lost = soak.lost + rounds_going_back(records)
    final_diff, final_round, compared = final_difference(soak.partners)
    leftovers = soak.leftover_processes
    lines = [
        f"# Churn soak: {soak.args.peers} partners (+{soak.new_partners} late joiners), "
        f"{soak.args.minutes} minutes, seed {soak.args.seed}",
        "",
        f"Command: `python scripts/churn_soak.py --peers {soak.args.peers} --minutes {soak.args.minutes} "
        f"--seed {soak.args.seed} --every {soak.args.every}`",
        "",
        "| partner | sessions | rounds completed | alone | failed | re-synced | last round |",
        "|---|---|---|---|---|---|---|",
    ]
    for partner in soak.partners:
        rs = records[partner.name]
        lines.append(
            f"| {partner.name} | {partner.sessions} | {len(rs)} | {sum(r['group_size'] == 1 for r in rs)} | "
            f"{sum(bool(r['failure']) for r in rs)} | {sum(r['resynced'] for r in rs)} | "
            f"{rs[-1]['round'] if rs else '-'} |"
        )
    lines += [
        "",
        f"- Rounds completed: {len(all_records)} partner-rounds; the swarm reached round "
        f"{max((r['round'] for r in all_records), default=0)}.",
        f"- Rounds failed ({sum(failures.values())}), by reason: "
        + (", ".join(f"{reason}: {count}" for reason, count in failures.most_common()) or "none"),
        f"- Agreement: {len(by_round)} rounds averaged in groups; rounds after which the partners that averaged "
        f"held more than one model: {len(disagreeing)}"
        + (f" ({', '.join(f'round {k}: {v} models' for k, v in sorted(disagreeing.items()))})" if disagreeing else "")
        + ".",
        f"- Largest parameter difference between partners' final checkpoints (round {final_round}, "
        f"{compared} partners): {final_diff:.3g}.",
        f"- Lost progress: {len(lost)}" + ("".join(f"\n  - {item}" for item in lost)),
        f"- Leftover processes: {len(leftovers)}" + ("".join(f"\n  - {item}" for item in leftovers)),
        "",
        "Events:",
        "",
        "```",
        *soak.events,
        "```",
    ]
    return "\n".join(lines) + "\n"


def rounds_going_back(records: dict[str, list[dict]]) -> list[str]:
    """A partner's shared round, across all its sessions, must never go backwards: each time it does."""
    return [
        f"{name}: round {after['round']} came after round {before['round']}"
        for name, rs in records.items()
        for before, after in itertools.pairwise(rs)
        if after["round"] <= before["round"]
    ]


def final_difference(partners: list[Partner]) -> tuple:
    """Largest |difference| between the final shared models of the partners that ended at the highest round."""
    finals = {}
    for partner in partners:
        folder = partner.folder / "ckpt"
        if (folder / "state.pt").exists():
            finals[partner.name] = (
                torch.load(folder / "state.pt", weights_only=True)["outer"]["round"],
                load_file(str(folder / "model.safetensors")),
            )
    if not finals:
        return float("nan"), 0, 0
    top = max(r for r, _ in finals.values())
    models = [m for r, m in finals.values() if r == top]
    diff = max((float((m[k] - models[0][k]).abs().max()) for m in models[1:] for k in models[0]), default=0.0)
    return diff, top, len(models)


def _reason(failure: str) -> str:
    return re.sub(r"\d+(\.\d+)?%", "N%", re.sub(r"^\d+ ", "N ", failure))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=5, help="partners at the start")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=30.0, help="mean seconds between churn events")
    parser.add_argument("--max-new", type=int, default=2, help="late joiners the driver may add")
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--quiet-tail", type=float, default=90.0, help="seconds without churn at the end")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="keep logs and checkpoints here (default: a temporary folder)")
    parser.add_argument("--report", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tapestry-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, workdir)
    try:
        soak.run()
    except KeyboardInterrupt:
        soak.stop_all()
    text = report(soak)
    print(text)
    if args.report:
        args.report.write_text(text)
    print(f"logs and checkpoints: {workdir}")


if __name__ == "__main__":
    main()
