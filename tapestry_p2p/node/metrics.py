"""What a node reports about its rounds: one `RoundMetrics` line per round in `--metrics` (JSON Lines), the status
record the peer table shows, and the `Summary` printed on stop. `read_jsonl` reads a metrics file back (the demo,
`tapestry plot`, the tests and the scripts all use it)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from tapestry_p2p.telemetry.status import MAX_FLAGGED, StatusPublisher

MAX_FAILURE_CHARS = 200  # the status record's bound on `last_failure`


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass
class RoundMetrics:
    """One line of `--metrics` (JSON Lines)."""

    round: int
    step: int
    inner_steps: int
    loss: float
    group_size: int
    bytes_sent: int
    bytes_received: int
    round_seconds: float
    time: float
    model_hash: str
    peer_id: str
    partner: str
    compression: str
    failure: Optional[str]
    resynced: bool
    # the round's agreed group (comm.agreement): its id (hex), its members' peer ids, sorted ([us] when alone or left
    # out), the attempt that formed it, and why we are not in it when we were left out
    group_id: str = ""
    members: list[str] = field(default_factory=list)
    attempt: int = 1
    left_out: Optional[str] = None
    meeting: float = 0.0  # the meeting (DHT time) the round was agreed at: with `round`, which agreement it was
    next_meeting: float = 0.0  # the next round's meeting, as the group's members proposed it to each other (0: none)
    lost_reducers: list[str] = field(default_factory=list)  # groupmates whose averaged spans we did not receive
    recovered: list[str] = field(default_factory=list)  # ... of which we fetched the span from its reducer after
    agreed_lost: list[str] = field(default_factory=list)  # spans some member still lacked (no update, on any member)
    unreported: list[str] = field(default_factory=list)  # members whose loss report never came (we compared states)
    refused: dict[str, str] = field(default_factory=dict)  # groupmate -> why we refused its contribution
    clipped: dict[str, float] = field(default_factory=dict)  # groupmate -> the factor we scaled its contribution by
    update_norm: float = 0.0  # L2 norm of our pseudo-gradient this round (what we declared; 0 when not averaged)
    seconds: dict[str, float] = field(default_factory=dict)  # where the round's time went (see `Phases`)
    # the split a WAN benchmark needs (also in `seconds`): inner steps; from the group's forming to our last averaged
    # part; waiting for the meeting and matchmaking (or for a round that went alone)
    compute_seconds: float = 0.0
    allreduce_seconds: float = 0.0
    wait_seconds: float = 0.0
    # since the previous record: the round of the swarm's state we caught up to, and from how many peers
    caught_up_round: Optional[int] = None
    caught_up_from: int = 0
    # a fresh run's round 1: when the --min-peers trainers were ready, by their status records (its meeting is
    # computed from it, three windows later, by every partner alike: matchmaking.MeetingClock.start); 0.0: not used
    swarm_ready: float = 0.0

    def to_json(self) -> str:
        record = asdict(self)
        record["loss"] = record["loss"] if math.isfinite(record["loss"]) else None
        return json.dumps(record)


class Phases:
    """Seconds per phase of one round since `started`: `with phases("outer_step"): ...`; repeated phases add up."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 4)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file, oldest first (empty if it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class MetricsWriter:
    """Appends each round's metrics to the `--metrics` file and reports them in the node's status record."""

    def __init__(self, path: Optional[Path], status: StatusPublisher, tokens_per_step: int) -> None:
        self.path, self.status, self.tokens_per_step = path, status, tokens_per_step
        self.sent_total = self.received_total = 0
        self.refused: Counter[str] = Counter()  # groupmate -> rounds in which we refused or left out its contribution
        self.clipped: Counter[str] = Counter()  # groupmate -> rounds in which we clipped it

    def write(self, record: RoundMetrics, training_seconds: float) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(record.to_json() + "\n")
        self.sent_total += record.bytes_sent
        self.received_total += record.bytes_received
        self.refused.update(record.refused.keys())
        self.clipped.update(record.clipped.keys())
        tokens = record.inner_steps * self.tokens_per_step
        self.status.update(
            state="training",
            round=record.round,
            inner_step=record.step,
            loss=record.loss if math.isfinite(record.loss) else None,
            tokens_per_second=float(tokens / max(training_seconds, 1e-6)),
            bytes_sent_round=record.bytes_sent,
            bytes_received_round=record.bytes_received,
            bytes_sent_total=self.sent_total,
            bytes_received_total=self.received_total,
            group_size=record.group_size,
            round_seconds=float(record.round_seconds),
            last_failure=record.failure[:MAX_FAILURE_CHARS] if record.failure else None,
            refused=dict(self.refused.most_common(MAX_FLAGGED)),
            clipped=dict(self.clipped.most_common(MAX_FLAGGED)),
        )


@dataclass
class Summary:
    rounds: int  # outer rounds completed in this session
    round: int  # the shared model's round number
    steps: int
    last_loss: float
    seconds: float

    def line(self) -> str:
        loss = f"{self.last_loss:.3f}" if math.isfinite(self.last_loss) else "n/a"
        return (
            f"stopped after {self.rounds} rounds this session (shared round {self.round}, "
            f"{self.steps} inner steps, last loss {loss}, {self.seconds:.0f}s)"
        )
