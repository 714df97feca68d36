"""Agreement soak: N partners on loopback for M minutes while a driver kills, stalls, skews, loads, restarts and adds
partners at random, and the report reads from the round records whether every agreed group stayed agreed.

The swarm: two bootstrap nodes; N partners, the first few started at once and the rest late (one every few seconds
of the first minute); with `--skew S`, partner p0's clock runs S seconds ahead and p1's S seconds behind for their
whole lives (libfaketime: `apt-get install faketime`). What the driver does, every `--every` seconds (with jitter),
picked at random:
- `kill`: SIGKILL a running partner (whatever it is doing); restart it later from its checkpoint and identity;
- `term`: SIGTERM a running partner (it checkpoints where it is, mid-round included); restart it later;
- `crash`: restart a stopped partner armed to SIGKILL itself in the middle of an all-reduce (tests/faulty_join.py);
- `stall`: SIGSTOP a partner's Python processes (node, DHT, averager; p2pd keeps running) for 3-8 s, as a starved
  machine would be;
- `load`: two busy loops beside the swarm for 30-60 s (CPU contention on our two cores);
- `new`: a brand-new partner (a late joiner, up to `--max-new` of them).
The last `--quiet-tail` seconds have no churn and every stopped partner is back; then every node gets SIGTERM.
`--faults none` runs the same swarm without a driver (the scale runs: `--peers 16 --faults none`).

Report (Markdown, printed and written to `--report`), from the partners' metrics (one record per round each, with
the round's agreement: its meeting, group id, members, who was left out and why, whose spans were lost):
- partner-rounds and agreements; the share of full groups (the group held every partner that recorded the round);
- **member lists**: agreements in which a member listed in another's group recorded another group, or none;
- **lost spans**: spans a member did not receive, and those whose reducer completed the same round (alive);
- **one model**: after every fault, how many rounds until every partner's shared model was one again;
- final checkpoints: the largest parameter difference between partners ending at the same round;
- lost progress (a restart that resumed behind its checkpoint) and leftover processes.

Run from the repository root (2 cores: about `--minutes` + 2 minutes):
    .venv/bin/python scripts/churn_soak.py --peers 8 --minutes 20 --skew 0.5 --report docs/churn-soak.md
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil
import torch
from safetensors.torch import load_file

from tapestry_p2p.node.metrics import read_jsonl
from tapestry_p2p.testing.local_swarm import LOOPBACK, TINY_MODEL, LocalSwarm

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tapestry_p2p" / "app" / "corpus"
FAULTY_JOIN = ROOT / "tests" / "faulty_join.py"
LANGUAGES = ("en", "es", "de")
RUN_ID = "soak"
STOP_GRACE = 60.0  # seconds a partner gets to checkpoint and exit after SIGTERM
RESUMED = re.compile(r"resumed from \S+ at round (\d+), step (\d+)")
FAULTS = ("kill", "term", "crash", "stall", "load", "new")
BUSY = "while True: pass"


@dataclass
class Partner:
    name: str
    language: str
    folder: Path
    clock: str = ""  # libfaketime offset, e.g. "+0.5s" ("" : the machine's clock)
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
        self.faults: list[tuple[float, str]] = []  # (unix time, what) of every fault, for the recovery check
        self.lost: list[str] = []
        self.leftover_processes: list[str] = []
        self.started = time.monotonic()
        self.new_partners = 0
        self.busy: list[subprocess.Popen] = []

    # ---- processes ----

    def start_bootstraps(self, count: int) -> None:
        for i in range(count):
            self.boot_addrs.append(self.swarm.start_bootstrap(f"boot{i}", run_id=RUN_ID, timeout=120))

    def add_partner(self, clock: str = "") -> Partner:
        index = len(self.partners)
        partner = Partner(f"p{index}", LANGUAGES[index % len(LANGUAGES)], self.workdir / f"p{index}", clock)
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
        folder = partner.folder
        args = ["join", "--initial-peers", *self.boot_addrs, "--run-id", RUN_ID, "--partner", partner.name]
        args += ["--data", str(CORPUS / f"{partner.language}.txt"), "--listen", LOOPBACK]
        args += ["--identity", str(folder / "identity.key"), "--checkpoint-dir", str(folder / "ckpt")]
        args += ["--metrics", str(folder / "metrics.jsonl")]
        args += ["--inner-steps", str(self.args.inner_steps)] if self.args.inner_steps else []
        args += ["--round-window", str(self.args.round_window)] if self.args.round_window else []
        args += ["--threads", "1", "--quiet", "--min-peers", str(self.args.min_peers), *TINY_MODEL]
        program = ("-m", "tapestry_p2p")
        if crash_in_allreduce:
            program = (str(FAULTY_JOIN), "--crash-in-allreduce", str(crash_in_allreduce))
        prefix = ("faketime", "-f", partner.clock) if partner.clock else ()
        # the wall clock (hivemind's DHT time) is shifted, the monotonic clock is not: libfaketime 0.9.10 breaks
        # Python's timed waits in threads when it shifts the monotonic clock (they never return)
        env = {"FAKETIME_DONT_FAKE_MONOTONIC": "1"} if partner.clock else None
        partner.popen = self.swarm.start(partner.session_name, *args, program=program, prefix=prefix, env=env)
        armed = ", armed to crash" if crash_in_allreduce else ""
        clock = f", clock {partner.clock}" if partner.clock else ""
        self.note(f"start {partner.name} (session {partner.sessions}{armed}{clock})")

    def track_descendants(self) -> None:
        for popen in self.swarm.started:
            if popen.poll() is None:
                self.swarm.remember_children(popen)

    def note(self, text: str, fault: bool = False) -> None:
        line = f"{time.monotonic() - self.started:7.1f}s  {text}"
        self.events.append(line)
        if fault:
            self.faults.append((time.time(), text))
        print(line, flush=True)

    # ---- faults ----

    def stall(self, partner: Partner, seconds: float) -> None:
        """SIGSTOP the partner's Python processes (p2pd keeps running) for `seconds`, then SIGCONT them."""
        assert partner.popen is not None
        try:
            tree = [psutil.Process(partner.popen.pid), *psutil.Process(partner.popen.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        stopped = []
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                if process.name() != "p2pd" and process.pid not in [b.pid for b in self.busy]:
                    process.send_signal(signal.SIGSTOP)
                    stopped.append(process)

        def resume() -> None:
            for process in stopped:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGCONT)

        threading.Timer(seconds, resume).start()

    def load(self, seconds: float) -> None:
        """Two busy loops beside the swarm, stopped (by pid) after `seconds`."""
        loops = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2)]
        self.busy += loops

        def stop() -> None:
            for loop in loops:
                loop.kill()
                loop.wait()

        threading.Timer(seconds, stop).start()

    def churn_once(self) -> None:
        running = [p for p in self.partners if p.running]
        stopped = [p for p in self.partners if not p.running]
        actions = [a for a in self.args.faults if a in ("stall", "load")] if running else []
        if len(running) > 2:
            actions += [a for a in self.args.faults if a in ("kill", "term")]
        if stopped:
            actions += ["restart"] + [a for a in self.args.faults if a == "crash"]
        if self.new_partners < self.args.max_new and "new" in self.args.faults:
            actions.append("new")
        if not actions:
            return
        action = self.rng.choice(actions)
        if action in ("kill", "term"):
            victim = self.rng.choice(running)
            self.track_descendants()
            assert victim.popen is not None
            victim.popen.send_signal(signal.SIGKILL if action == "kill" else signal.SIGTERM)
            self.note(f"{action} {victim.name}", fault=True)
        elif action in ("restart", "crash"):
            partner = self.rng.choice(stopped)
            self.check_resume_of_last_session(partner)
            self.start(partner, crash_in_allreduce=self.rng.randint(1, 3) if action == "crash" else None)
            if action == "crash":
                self.faults.append((time.time(), f"{partner.name} armed to crash"))
        elif action == "stall":
            victim, seconds = self.rng.choice(running), self.rng.uniform(3.0, 8.0)
            self.stall(victim, seconds)
            self.note(f"stall {victim.name} for {seconds:.1f}s", fault=True)
        elif action == "load":
            seconds = self.rng.uniform(30, 60)
            self.load(seconds)
            self.note(f"load: two busy loops for {seconds:.0f}s", fault=True)
        else:
            self.new_partners += 1
            self.note(f"new partner {self.add_partner().name}", fault=True)

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
        skews = [f"+{self.args.skew}s", f"-{self.args.skew}s"] if self.args.skew else []
        at_once = self.args.peers if not self.args.late_starts else max(2, self.args.peers * 5 // 8)
        for i in range(at_once):
            self.add_partner(skews[i] if i < len(skews) else "")
        late = self.args.peers - at_once  # the others start late, spread over the first minute
        late_at = [time.monotonic() + 15 + 45 * (k + 1) / max(late, 1) for k in range(late)]
        end = self.started + 60 * self.args.minutes
        churn_until = end - self.args.quiet_tail
        next_event = time.monotonic() + 60  # let the swarm form first
        while time.monotonic() < end:
            self.track_descendants()
            if late_at and time.monotonic() >= late_at[0]:
                late_at.pop(0)
                self.note(f"late start {self.add_partner().name}", fault=True)
            if self.args.faults and next_event <= time.monotonic() < churn_until:
                self.churn_once()
                next_event = time.monotonic() + self.args.every * self.rng.uniform(0.5, 1.5)
            if time.monotonic() >= churn_until:  # settle: bring every stopped partner back
                for partner in self.partners:
                    if not partner.running and partner.sessions and time.monotonic() < end - 90:
                        self.check_resume_of_last_session(partner)
                        self.start(partner)
            time.sleep(0.5)
        self.stop_all()

    def stop_all(self) -> None:
        """SIGTERM every process (partners checkpoint and exit); note any that had to be killed."""
        for loop in self.busy:
            if loop.poll() is None:
                loop.kill()
        self.track_descendants()
        for popen in self.swarm.stop_all():
            name = next((p.name for p in self.partners if p.popen is popen), "a bootstrap node")
            self.note(f"{name} did not stop within {STOP_GRACE:.0f}s of SIGTERM: killed")
        time.sleep(3)
        self.leftover_processes = [f"{p.pid} {p.name()}" for p in self.swarm.leftovers()]
        for partner in self.partners:
            self.check_resume_of_last_session(partner)


# ---- the report ----


@dataclass
class Agreement:
    """What the records say about the agreements of a run."""

    slots: int  # agreements (round, meeting) with at least one record
    averaged_slots: int  # ... in which some group averaged
    full: float  # share of averaged agreements whose group held every partner that recorded that round
    sizes: Counter  # group size -> partner-rounds
    disagreements: list[str]  # a member listed in someone's group recorded another group
    missing: list[str]  # a member listed in someone's group has no record of that agreement (it died or stalled)
    lost_spans: int
    lost_alive: list[str]  # spans lost in the all-reduce whose reducer completed the same round
    unrecovered: int  # ... of which the member did not fetch the span from its reducer afterwards (comm.losses)
    left_out: Counter  # reason -> partner-rounds


def agreement_of(records: dict[str, list[dict]]) -> Agreement:
    name_of = {r["peer_id"]: name for name, rows in records.items() for r in rows}
    by_slot: dict[tuple, dict[str, dict]] = defaultdict(dict)
    rounds: dict[int, set[str]] = defaultdict(set)
    for name, rows in records.items():
        for row in rows:
            by_slot[(row["round"], row["meeting"])][name] = row
            rounds[row["round"]].add(name)
    disagreements, missing, lost_alive = [], [], []
    unrecovered = 0
    averaged, full, lost_spans = 0, 0, 0
    for slot, rows in sorted(by_slot.items()):
        groups = {tuple(r["members"]) for r in rows.values() if r["group_size"] > 1 and r["left_out"] is None}
        if groups:
            averaged += 1
            full += len(groups) == 1 and {name_of.get(p) for p in next(iter(groups))} >= rounds[slot[0]]
        for name, row in rows.items():
            if row["group_size"] < 2:
                continue
            for member in row["members"]:
                theirs = rows.get(name_of.get(member, "?"))
                if theirs is None:
                    missing.append(f"round {slot[0]}: {name} lists {name_of.get(member, member)}, which has no record")
                elif theirs["members"] != row["members"]:
                    disagreements.append(
                        f"round {slot[0]}: {name} recorded {len(row['members'])} members, "
                        f"{name_of[member]} recorded {len(theirs['members'])} ({theirs['left_out'] or 'averaged'})"
                    )
            for reducer in row.get("lost_reducers", []):
                lost_spans += 1
                theirs = rows.get(name_of.get(reducer, "?"))
                if theirs is not None and theirs["left_out"] is None:
                    fetched = reducer in row.get("recovered", [])
                    unrecovered += not fetched
                    lost_alive.append(
                        f"round {slot[0]}: {name} lost {name_of[reducer]}'s span; it completed the round"
                        + ("; fetched from it afterwards" if fetched else "")
                    )
    sizes = Counter(r["group_size"] for rows in records.values() for r in rows)
    left_out = Counter(_reason(r["left_out"]) for rows in records.values() for r in rows if r["left_out"])
    return Agreement(
        len(by_slot),
        averaged,
        full / max(averaged, 1),
        sizes,
        sorted(set(disagreements)),
        sorted(set(missing)),
        lost_spans,
        lost_alive,
        unrecovered,
        left_out,
    )


def recoveries(records: dict[str, list[dict]], faults: list[tuple[float, str]]) -> list[tuple[str, Optional[int]]]:
    """For every fault: how many rounds it took until every partner's shared model was one (None: never)."""
    hashes: dict[int, dict[str, str]] = defaultdict(dict)  # round -> partner -> model after its last record of it
    ended: dict[int, float] = defaultdict(float)  # round -> when its last record was written
    for name, rows in records.items():
        for row in rows:
            if row["left_out"] is None:
                hashes[row["round"]][name] = row["model_hash"]
                ended[row["round"]] = max(ended[row["round"]], row["time"])
    out = []
    for at, what in faults:
        after = sorted(r for r in hashes if ended[r] > at)
        one = next((i for i, r in enumerate(after) if len(set(hashes[r].values())) == 1), None)
        out.append((what, one))
    return out


def report(soak: Soak) -> str:
    """The Markdown report of a finished soak."""
    records = {p.name: read_jsonl(p.folder / "metrics.jsonl") for p in soak.partners}
    all_records = [r for rs in records.values() for r in rs]
    agreement = agreement_of(records)
    recovered = recoveries(records, soak.faults)
    slowest = max((n for _, n in recovered if n is not None), default=0)
    never = [what for what, n in recovered if n is None]
    lost = soak.lost + rounds_going_back(records)
    final_diff, final_round, compared = final_difference(soak.partners)
    args = soak.args
    command = "python scripts/churn_soak.py " + shlex.join(sys.argv[1:])  # (as it was invoked)
    lines = [
        f"# Agreement soak: {args.peers} partners (+{soak.new_partners} late joiners), {args.minutes} minutes, "
        f"seed {args.seed}",
        "",
        f"Command: `{command}`",
        "",
        "| partner | sessions | rounds | in a group | alone | left out | lost spans | last round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for partner in soak.partners:
        rs = records[partner.name]
        grouped = sum(r["group_size"] > 1 and r["left_out"] is None for r in rs)
        alone = sum(r["group_size"] == 1 and r["left_out"] is None for r in rs)
        lost_spans = sum(len(r.get("lost_reducers", [])) for r in rs)
        lines.append(
            f"| {partner.name}{' (' + partner.clock + ')' if partner.clock else ''} | {partner.sessions} | {len(rs)} "
            f"| {grouped} | {alone} | {sum(bool(r['left_out']) for r in rs)} | {lost_spans} "
            f"| {rs[-1]['round'] if rs else '-'} |"
        )
    sizes = ", ".join(f"{size}: {count}" for size, count in sorted(agreement.sizes.items()))
    lines += [
        "",
        f"- Partner-rounds: {len(all_records)} in {agreement.slots} agreements; the swarm reached round "
        f"{max((r['round'] for r in all_records), default=0)}. Group sizes (partner-rounds): {sizes}.",
        f"- Full groups: {agreement.full:.1%} of the {agreement.averaged_slots} agreements that averaged held every "
        "partner that recorded the round.",
        "- Left out (partner-rounds), by reason: "
        + (", ".join(f"{reason}: {count}" for reason, count in agreement.left_out.most_common()) or "none"),
        f"- **Member lists that differ: {len(agreement.disagreements)}**"
        + "".join(f"\n  - {item}" for item in agreement.disagreements),
        f"- Members listed without a record of the round (dead or stalled then): {len(agreement.missing)}"
        + "".join(f"\n  - {item}" for item in agreement.missing[:20]),
        f"- **Spans lost: {agreement.lost_spans}, of which their reducer completed the round: "
        f"{len(agreement.lost_alive)}, of which not fetched from it afterwards: {agreement.unrecovered}**"
        + "".join(f"\n  - {item}" for item in agreement.lost_alive),
        f"- **One model after every fault**: {len(recovered)} faults; the slowest took {slowest} rounds to one model"
        + (f"; never after: {', '.join(never)}" if never else "")
        + " ("
        + ", ".join(f"{n}" for _, n in recovered)
        + ").",
        f"- Largest parameter difference between partners' final checkpoints (round {final_round}, "
        f"{compared} partners): {final_diff:.3g}.",
        f"- Lost progress: {len(lost)}" + "".join(f"\n  - {item}" for item in lost),
        f"- Leftover processes: {len(soak.leftover_processes)}"
        + "".join(f"\n  - {item}" for item in soak.leftover_processes),
        "",
        "Events:",
        "",
        "```",
        *soak.events,
        "```",
    ]
    return "\n".join(lines) + "\n"


def rounds_going_back(records: dict[str, list[dict]]) -> list[str]:
    """A partner's shared round, across all its sessions, never goes backwards (a round it was left out of may be
    met again: the same round twice is not going back)."""
    return [
        f"{name}: round {after['round']} came after round {before['round']}"
        for name, rs in records.items()
        for before, after in itertools.pairwise(rs)
        if after["round"] < before["round"] or (after["round"] == before["round"] and not before["left_out"])
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


def _reason(text: str) -> str:
    return re.sub(r"#\d+", "#N", re.sub(r"\d+(\.\d+)?%", "N%", text))[:80]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8, help="partners (the last ones start late)")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--every", type=float, default=20.0, help="mean seconds between faults")
    parser.add_argument("--faults", nargs="*", default=list(FAULTS), help=f"some of {', '.join(FAULTS)}; or none")
    parser.add_argument("--skew", type=float, default=0.0, help="seconds p0's clock is ahead, and p1's behind")
    parser.add_argument("--max-new", type=int, default=2, help="late joiners the driver may add")
    parser.add_argument("--no-late-starts", dest="late_starts", action="store_false", help="start all at once")
    parser.add_argument("--min-peers", type=int, default=1, help="partners each waits for before its first round")
    parser.add_argument("--inner-steps", type=int, default=20, help="H (0: the node's default)")
    parser.add_argument("--round-window", type=float, default=0.0, help="the nodes' --round-window (0: their default)")
    parser.add_argument("--quiet-tail", type=float, default=120.0, help="seconds without faults at the end")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="keep logs and checkpoints here (default: a temporary folder)")
    parser.add_argument("--report", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    args.faults = [f for f in args.faults if f != "none"]
    if unknown := set(args.faults) - set(FAULTS):
        raise SystemExit(f"--faults: unknown {', '.join(sorted(unknown))}; pick from {', '.join(FAULTS)}")
    if args.skew and shutil.which("faketime") is None:
        raise SystemExit("--skew needs libfaketime: apt-get install faketime")
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
