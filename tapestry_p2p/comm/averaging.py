"""One outer round's communication: all-reduce a pseudo-gradient with the round's agreed group, keep it when alone, or
hand it back when the group went on without us.

`Averaging` is the interface the node sees; `SwarmAveraging` implements it with `ExactAverager` (agreed groups and the
bit-exact butterfly all-reduce) around a fixed set of flat delta buffers, and `SoloAveraging` with no network (the
trained-alone baseline). Neither knows what the tensors are: the node hands in a list of tensors and gets a list back.
`average` is the round's one blocking call; the node runs it in a background thread (node.rounds).

Agreement (comm.agreement): every member declares its shared model (round and hash), inner steps and update norm, signed
by itself; the group is the declarers holding the state a majority holds, and runs only once every member voted for
exactly it. A round's result is one of:
- averaged: the group's weighted mean (weights: each member's declared inner steps, at most H), bit-identical on every
  member, with `group_id` and `members`;
- alone: nobody else declared the round; our own pseudo-gradient is the average;
- left out (`left_out` says why: declared late, state differs, not seen by a member, silent, no agreement, or the
  all-reduce failed after the group formed): nothing of ours was applied anywhere, `averaged` is empty and `others`
  names who will hold the state the round ends on; the node keeps its update as progress and takes that state.

Influence: the weight is the member's declared steps; before encoding, a pseudo-gradient that is not finite is replaced
by zeros at a negligible weight (the codec would turn NaN into finite values); each reducer screens and clips its
senders against their own signed declarations (`screening.py`), and the round's result says whom we refused or clipped.

A span that any member lost (a groupmate died mid-stream, a stream broke) gets no update on every member: the members
tell each other what they lost (`comm.losses`). A round in which some member's report never came ends with a second
comparison, `agreed_state`, among the members that finished it. An exception inside our own code (here or in the
averager's overrides) is logged with its traceback and reported as `internal error ...`, so it shows in the metrics and
the peer table.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch
from hivemind.compression import CompressionInfo
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from tapestry_p2p.comm.agreement import ALONE, Contribution, Declaration
from tapestry_p2p.comm.averager import AllReduceOutcome, ExactAverager
from tapestry_p2p.comm.codec import compression_for
from tapestry_p2p.comm.error_feedback import ErrorFeedback
from tapestry_p2p.comm.matchmaking import DECLARE_LEAD, Pace
from tapestry_p2p.comm.screening import DEFAULT_CLIP_MULTIPLE
from tapestry_p2p.comm.statesync.client import Download, StateClient
from tapestry_p2p.comm.statesync.wire import PeerState, StateId
from tapestry_p2p.comm.voting import Timing
from tapestry_p2p.security.membership import Members

__all__ = ["AveragingConfig", "AveragingResult", "RoundMeta", "SoloAveraging", "SwarmAveraging", "alone"]

logger = logging.getLogger(__name__)

# The longest an all-reduce may take once the group is formed: this many seconds, plus the time our payload takes at
# SLOWEST_LINK (a 25M-parameter model in float32 needs ~55 s at 20 Mbit/s; a fixed 60 s made every such round fail).
ALLREDUCE_TIMEOUT = 60.0
SLOWEST_LINK = 250_000  # bytes per second (2 Mbit/s)
# A groupmate silent for this long (per part) is dropped from the round: a few seconds plus one part at SLOWEST_LINK.
NEXT_CHUNK_TIMEOUT = 5.0
# Smaller parts balance the reducers' load better on small models (hivemind splits each span into parts this big).
PART_SIZE_BYTES = 64 * 1024
DECLARE_STATE_PERIOD = 10.0  # seconds between hivemind's re-declarations that we serve our state
STEP_GRACE = 30.0  # beyond the longest a round can take, how long the node waits for the averager process to answer


@dataclass(frozen=True)
class RoundMeta:
    """What the node hands in with its pseudo-gradient: the shared model it was computed against, and its steps."""

    round: int  # the shared model's round going in
    hash: str  # its hash
    steps: int  # inner steps this round (its weight is `screening.weight_for(steps, H)`)
    pace: Pace = Pace()  # when it can meet for the next round (proposed to the group: comm.matchmaking.Pace)


@dataclass
class AveragingConfig:
    """What a node's averaging needs: the tensors' shapes, the run's codec and H, the run spec's digest (peers of
    another spec never meet), the clipping bound and the agreed group's deadlines."""

    shapes: Sequence[torch.Size]
    compression: str
    max_steps: int
    spec: str = ""
    clip_multiple: float = DEFAULT_CLIP_MULTIPLE
    timing: Timing = field(default_factory=Timing)


@dataclass
class AveragingResult:
    averaged: list[torch.Tensor]  # the average to apply (empty when we were left out of the round)
    group_size: int
    bytes_sent: int = 0
    bytes_received: int = 0
    group_id: str = ""  # hex of the agreed group's id ("" when alone or left out)
    members: list[str] = field(default_factory=list)  # the agreed group's peer ids, sorted ([us] when alone)
    attempt: int = 1  # the agreement attempt that formed the group (or that we left at)
    left_out: Optional[str] = None  # why we are not in the round's group (then `averaged` is empty)
    others: list[str] = field(default_factory=list)  # left out: the peers that will hold the state the round ends on
    failure: Optional[str] = None  # what went wrong in the round, if anything (the reason we were left out, too)
    group_round: int = 0  # the round the group reaches with this round
    clean: bool = True  # we hold the group's outcome: every member told us which spans it lost (comm.losses)
    lost_reducers: list[str] = field(default_factory=list)  # groupmates whose averaged spans we did not receive
    recovered: list[str] = field(default_factory=list)  # ... of which we fetched the span from its reducer after
    agreed_lost: list[str] = field(default_factory=list)  # spans some member still lacked: no update, on any member
    unreported: list[str] = field(default_factory=list)  # members whose loss report never came (not `clean`)
    next_meeting: float = 0.0  # when the group meets for the next round, as its members proposed (0.0: unknown)
    meeting: float = 0.0  # the meeting the round was agreed at (with the round: which agreement it was)
    refused: dict[str, str] = field(default_factory=dict)  # groupmate -> why we refused its parts as a reducer
    clipped: dict[str, float] = field(default_factory=dict)  # groupmate -> the factor we scaled its parts by
    norm: float = 0.0  # the L2 norm of our pseudo-gradient, as we declared it
    # seconds: "copy_in"/"copy_out" (into and out of the averager's shared buffers), "norm", "wait" (declaring and
    # agreeing on the group), "allreduce" (from the group's commit to our last averaged part), "reports" (then: serving
    # our span to the groupmates still reading it, fetching a lost span, the loss reports that agree the next meeting)
    seconds: dict[str, float] = field(default_factory=dict)


def alone(delta: Sequence[torch.Tensor], failure: Optional[str] = None) -> AveragingResult:
    """The result of a round without a group: our own pseudo-gradient."""
    return AveragingResult([d.clone() for d in delta], group_size=1, failure=failure, clean=failure is None)


class Averaging(Protocol):
    """What a node needs from the network for its rounds and its state (SwarmAveraging, or SoloAveraging)."""

    peer_id: str
    longest_round: float  # the most seconds a round can take from our call to its end (its all-reduce included)

    def average(self, delta: Sequence[torch.Tensor], meeting: float, meta: RoundMeta) -> AveragingResult: ...

    def intend(self, meeting: float, round_no: int, state_hash: str) -> None: ...

    def publish_round(self, round_no: int) -> None: ...

    def highest_round_online(self) -> int: ...

    def positions(self) -> dict[str, int]: ...

    def download_state(
        self,
        min_round: int,
        peers: Optional[Sequence[str]] = None,
        want: Optional[StateId] = None,
        have: Optional[StateId] = None,
    ) -> Optional[Download]: ...

    def may_reach(self, round_no: int, peers: Sequence[str]) -> bool: ...

    def now(self) -> float: ...

    def lead(self) -> float: ...

    def ahead(self, window: float) -> float: ...

    def agreed_state(self, me: str, mine: PeerState, others: Sequence[str], group_round: int) -> Optional[StateId]: ...

    def shutdown(self) -> None: ...


class SoloAveraging:
    """No network: the peer's own pseudo-gradient is the average (a peer alone, or the trained-alone baseline)."""

    peer_id = "solo"
    longest_round = 0.0

    def average(self, delta: Sequence[torch.Tensor], meeting: float, meta: RoundMeta) -> AveragingResult:
        return alone(delta)

    def intend(self, meeting: float, round_no: int, state_hash: str) -> None:
        pass

    def publish_round(self, round_no: int) -> None:
        pass

    def highest_round_online(self) -> int:
        return -1

    def positions(self) -> dict[str, int]:
        return {}

    def download_state(
        self,
        min_round: int,
        peers: Optional[Sequence[str]] = None,
        want: Optional[StateId] = None,
        have: Optional[StateId] = None,
    ) -> Optional[Download]:
        return None

    def may_reach(self, round_no: int, peers: Sequence[str]) -> bool:
        return False

    def now(self) -> float:
        return float(get_dht_time())

    def lead(self) -> float:
        return DECLARE_LEAD

    def ahead(self, window: float) -> float:
        return window

    def agreed_state(self, me: str, mine: PeerState, others: Sequence[str], group_round: int) -> Optional[StateId]:
        return mine.id

    def shutdown(self) -> None:
        pass


class SwarmAveraging:
    """All-reduce through the agreed group of each round (see the module docstring)."""

    averager_class: type[ExactAverager] = ExactAverager  # test subclasses inject faults here (testing.faults)

    def __init__(
        self,
        dht: DHT,
        run_id: str,
        owner: bytes,
        config: AveragingConfig,
        state_fn: Callable[[], tuple[dict[str, Any], list[torch.Tensor]]],
        members: Optional[Members] = None,
        feedback: Optional[ErrorFeedback] = None,
    ) -> None:
        """`owner`: our owner-signed DHT subkey (declarations are stored under it); `state_fn`: what a peer downloads
        from us (called in a helper thread)."""
        self._buffers = [torch.zeros(shape) for shape in config.shapes]
        self._max_steps, self._timing = config.max_steps, config.timing
        self.feedback = feedback
        timeout = allreduce_timeout(config.shapes, config.compression)
        self.longest_round = config.timing.longest + timeout
        self._averager = self.averager_class(
            self._buffers,
            dht,
            prefix=f"{run_id}_avg",
            start=True,
            owner=owner,
            allreduce_timeout=timeout,
            next_chunk_timeout=NEXT_CHUNK_TIMEOUT,
            part_size_bytes=PART_SIZE_BYTES,
            compression=compression_for(config.compression),
            state_fn=state_fn,
            declare_state_period=DECLARE_STATE_PERIOD,
            members=members or Members.open(),
            max_steps=config.max_steps,
            codec=config.compression,
            clip_multiple=config.clip_multiple,
            spec=config.spec,
            timing=config.timing,
            error_sink=None if feedback is None else feedback.pending,
        )
        self.peer_id = self._averager.peer_id.to_base58()
        self._states = StateClient(dht, self._averager)

    # ---- the state the swarm sees (statesync.client) ----

    def replace_members(self, names: Optional[dict[str, str]], version: int) -> None:
        self._averager.replace_members(names, version)

    def publish_round(self, round_no: int) -> None:
        self._states.publish_round(round_no)

    def highest_round_online(self) -> int:
        return self._states.highest_round_online()

    def positions(self) -> dict[str, int]:
        return self._states.positions()

    def download_state(
        self,
        min_round: int,
        peers: Optional[Sequence[str]] = None,
        want: Optional[StateId] = None,
        have: Optional[StateId] = None,
    ) -> Optional[Download]:
        return self._states.download_state(min_round, peers, want, have)

    def may_reach(self, round_no: int, peers: Sequence[str]) -> bool:
        return self._states.may_reach(round_no, peers)

    def now(self) -> float:
        """The swarm's time (comm.swarm_clock): what meetings and cut-offs are in."""
        return self._averager.clock.now()

    def lead(self) -> float:
        """How long before a meeting to stop training (comm.voting.Timing.lead, at our measured store latency)."""
        return self._timing.lead(self._averager.store_seconds.value)

    def ahead(self, window: float) -> float:
        """How far ahead to call a meeting (comm.voting.Timing.ahead: the window, or more while the DHT is slow)."""
        return self._timing.ahead(window, self._averager.store_seconds.value)

    def agreed_state(self, me: str, mine: PeerState, others: Sequence[str], group_round: int) -> Optional[StateId]:
        return self._states.agreed_state(me, mine, others, group_round)

    # ---- one round ----

    def intend(self, meeting: float, round_no: int, state_hash: str) -> None:
        """We know our next meeting and the state we will declare against: store our declaration now, in the
        background (`average` stores it otherwise, with less time to spare)."""
        self._averager.intend(Declaration(self.peer_id, round_no, float(meeting), state_hash))

    def average(self, delta: Sequence[torch.Tensor], meeting: float, meta: RoundMeta) -> AveragingResult:
        """Our update for the round `meeting` is for: agree on the group, all-reduce with it."""
        clock = [time.perf_counter()]
        seconds: dict[str, float] = {}

        def lap(name: str) -> None:
            now = time.perf_counter()
            seconds[name] = round(now - clock[0], 4)
            clock[0] = now

        result = self._average(delta, meeting, meta, lap, seconds)
        result.seconds, result.meeting = seconds, float(meeting)
        return result

    def _average(
        self,
        delta: Sequence[torch.Tensor],
        meeting: float,
        meta: RoundMeta,
        lap: Callable[[str], None],
        seconds: dict[str, float],
    ) -> AveragingResult:
        declaration = Declaration(self.peer_id, meta.round, float(meeting), meta.hash)
        contribution, finite = self._copy_in(delta, meta, lap)
        try:
            try:
                timeout = max(meeting - self.now(), 0.0) + self.longest_round + STEP_GRACE
                outcome = self._averager.agreed_step(declaration, contribution, timeout, meta.pace)
            finally:
                lap("wait")  # split below into agreeing on the group and the all-reduce itself
        except Exception as e:  # noqa: BLE001 (the averager process answers with outcomes: this is ours, or a pipe)
            logger.exception("averaging failed inside tapestry (a bug, not the network)")
            failure = f"internal error in averaging: {type(e).__name__}: {e}"
            return self._left_out(failure, [], declaration, contribution, failure=failure)
        if outcome.failure:
            logger.warning("round %d: %s; following the group's outcome", meta.round + 1, outcome.failure)
            return self._left_out(
                outcome.failure, outcome.others, declaration, contribution, outcome.attempt, outcome.failure
            )
        if outcome.left_out == ALONE:
            return self._alone(delta)
        if outcome.left_out:
            return self._left_out(outcome.left_out, outcome.others, declaration, contribution, outcome.attempt)
        if outcome.started:
            together = min(seconds["wait"], max(time.time() - outcome.started, 0.0))  # the all-reduce and its reports
            transfer = min(together, max(outcome.averaged - outcome.started, 0.0)) if outcome.averaged else together
            seconds["allreduce"], seconds["reports"] = round(transfer, 4), round(together - transfer, 4)
            seconds["wait"] = round(seconds["wait"] - together, 4)
        with self._averager.get_tensors() as buffers:
            averaged = [b.clone() for b in buffers]
        lap("copy_out")
        if not all(torch.isfinite(a).all() for a in averaged):
            others = [p for p in outcome.members if p != self.peer_id]
            failure = "the group's average is not finite"
            return self._left_out(failure, others, declaration, contribution, outcome.attempt)
        if self.feedback is not None:
            if not finite:  # we contributed nothing, and owe nothing
                self.feedback.reset()
            elif meta.steps > 0:
                self.feedback.sent(delta, outcome.failed_spans)
            # (no inner steps: our weight was 0, nothing of ours was averaged; we still owe the residual)
        return _result(averaged, outcome, declaration, contribution)

    def _copy_in(
        self, delta: Sequence[torch.Tensor], meta: RoundMeta, lap: Callable[[str], None]
    ) -> tuple[Contribution, bool]:
        """Our update into the averager's buffers (delta plus the residual it owes); what it weighs and measures."""
        with self._averager.get_tensors() as buffers:
            for buffer, d in zip(buffers, delta, strict=True):
                buffer.copy_(d)
            if self.feedback is not None:
                self.feedback.add_into(buffers)
            lap("copy_in")
            # per-tensor float32 norms, combined in double precision (a float64 copy of a 1B-parameter update would
            # cost 8 GB; reducers check declared norms with a 10% tolerance)
            norm = math.sqrt(sum(float(torch.linalg.vector_norm(b)) ** 2 for b in buffers))
            lap("norm")
            if math.isfinite(norm):
                return Contribution(meta.steps, norm), True
            logger.error("our pseudo-gradient is not finite: contributing nothing to round %d", meta.round + 1)
            for buffer in buffers:  # a lossy codec would turn NaN into finite values
                buffer.zero_()
            return Contribution(0, 0.0), False

    def _alone(self, delta: Sequence[torch.Tensor]) -> AveragingResult:
        """A round nobody else declared applies our whole contribution (delta plus what we owed): we owe nothing."""
        if self.feedback is None:
            result = alone(delta)
        else:
            result = AveragingResult(self.feedback.contribution(delta), group_size=1)
            self.feedback.reset()
        result.members = [self.peer_id]
        return result

    def _left_out(
        self,
        reason: str,
        others: Sequence[str],
        declaration: Declaration,
        contribution: Contribution,
        attempt: int = 1,
        failure: Optional[str] = None,
    ) -> AveragingResult:
        """A round the group (if any) averaged without us: nothing of ours was applied; we still owe the residual."""
        return AveragingResult(
            [],
            group_size=1,
            members=[self.peer_id],
            attempt=attempt,
            left_out=reason,
            others=sorted(others),
            failure=failure or f"left out of the round's group: {reason}",
            group_round=declaration.round + 1,
            clean=False,
            norm=contribution.norm,
        )

    def shutdown(self) -> None:
        self._states.close()
        self._averager.shutdown()
        self._averager.join(timeout=10)
        if self._averager.is_alive():
            self._averager.kill()


def allreduce_timeout(shapes: Sequence[torch.Size], compression: str) -> float:
    """ALLREDUCE_TIMEOUT, plus what a member sends and receives in a butterfly all-reduce (at most twice the coded
    model, each way) at SLOWEST_LINK."""
    values = sum(math.prod(shape) for shape in shapes)
    probe = torch.zeros(1)
    coded = 4 * values * compression_for(compression).estimate_compression_ratio(CompressionInfo.from_tensor(probe))
    return ALLREDUCE_TIMEOUT + 2 * coded / SLOWEST_LINK


def _result(
    averaged: list[torch.Tensor], outcome: AllReduceOutcome, declaration: Declaration, contribution: Contribution
) -> AveragingResult:
    """What a completed all-reduce means for the node: the average, the group, and what it lost."""
    failure = None
    if outcome.failed_fraction > 0:
        failure = f"{outcome.failed_fraction:.1%} of values lost their reducer (no update for them this round)"
    elif outcome.senders_lost:
        failure = f"{outcome.senders_lost} groupmates' parts never reached us"
    if outcome.unreported:
        unreported = f"{len(outcome.unreported)} groupmates did not report their losses"
        failure = unreported if failure is None else f"{failure}; {unreported}"
    return AveragingResult(
        averaged=averaged,
        group_size=len(outcome.members),
        bytes_sent=outcome.traffic.sent,
        bytes_received=outcome.traffic.received,
        group_id=outcome.group_id.hex(),
        members=list(outcome.members),
        attempt=outcome.attempt,
        failure=failure,
        group_round=declaration.round + 1,
        clean=not outcome.unreported,
        lost_reducers=list(outcome.lost_reducers),
        recovered=list(outcome.recovered),
        agreed_lost=list(outcome.agreed_lost),
        unreported=list(outcome.unreported),
        next_meeting=outcome.next_meeting,
        refused=outcome.refused,
        clipped=outcome.clipped,
        norm=contribution.norm,
    )
