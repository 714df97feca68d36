"""One outer round's communication: all-reduce a pseudo-gradient with whoever meets, or keep it when alone.

`Averaging` is the interface the node sees; `SwarmAveraging` implements it with the bit-exact `ExactAverager`
(hivemind matchmaking + butterfly all-reduce) around a fixed set of flat delta buffers, and `SoloAveraging` with no
network (the trained-alone baseline). Neither knows what the tensors are: the node hands in a list of tensors and
gets a list back. `average` is the round's one blocking call; overlapped rounds (node.overlap) run it in a thread.

The average is weighted by each member's inner steps this round (see `SwarmAveraging.average`).

Agreement: only peers whose shared model is at one round meet (the round is part of hivemind's group key, so a peer
that missed a round goes alone and catches up, instead of mixing an update computed against an older model into the
next round). Every peer gathers its groupmates' `RoundMeta` (round, hash, steps, norm). If the group's members
disagree on the shared model (a round that split them, a peer that crashed and came back), the elected state is the
one a majority of them hold (see `statesync.policy.elected_state`: a claim to be ahead wins nothing); `needs_resync`
tells the other members to download it afterwards.

Influence: the weight is the member's inner steps, at most H; before encoding, a pseudo-gradient that is not finite is
replaced by zeros at a negligible weight (the codec would turn NaN into finite values); each reducer screens and clips
its senders (`screening.py`), and the round's result says whom we refused or clipped.

A round that lost a part (a groupmate died mid-stream) ends with a second comparison, `agreed_state`, among the
members that finished it.

Failures: "no group" and network failures end the round with our own update and a `failure` reason; an exception
inside our own code (here or in the averager's overrides) is logged with its traceback and reported the same way, as
`internal error ...`, so it shows in the metrics and the peer table instead of hiding as a round alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Protocol

import torch
from hivemind.compression import CompressionInfo
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from tapestry_p2p.comm.allreduce import NETWORK_FAILURES
from tapestry_p2p.comm.averager import AllReduceOutcome, AveragingBug, ExactAverager, FaultHook
from tapestry_p2p.comm.codec import compression_for
from tapestry_p2p.comm.error_feedback import ErrorFeedback
from tapestry_p2p.comm.matchmaking import MATCHMAKING_LEAD
from tapestry_p2p.comm.screening import DEFAULT_CLIP_MULTIPLE, RoundMeta, weight_for
from tapestry_p2p.comm.statesync.client import Download, StateClient
from tapestry_p2p.comm.statesync.policy import elected_state
from tapestry_p2p.comm.statesync.wire import PeerState, StateId
from tapestry_p2p.security.membership import Members

__all__ = ["AveragingResult", "RoundMeta", "SoloAveraging", "SwarmAveraging", "alone"]

logger = logging.getLogger(__name__)

MATCHMAKING_TIME = MATCHMAKING_LEAD - 0.5  # hivemind's min_matchmaking_time: how long a leader waits for followers
REQUEST_TIMEOUT = 1.0  # hivemind's request_timeout for one matchmaking request
MEETING_GRACE = 2.0  # after the meeting time, how long a peer keeps looking for its group before going alone
# The longest an all-reduce may take once the group is formed: this many seconds, plus the time our payload takes at
# SLOWEST_LINK (a 25M-parameter model in float32 needs ~55 s at 20 Mbit/s; a fixed 60 s made every such round fail).
# A groupmate that dies is dropped long before, after NEXT_CHUNK_TIMEOUT of silence.
ALLREDUCE_TIMEOUT = 60.0
SLOWEST_LINK = 250_000  # bytes per second (2 Mbit/s)
NEXT_CHUNK_TIMEOUT = 10.0  # a groupmate silent for this long is dropped from the round
# Smaller parts balance the reducers' load better on small models (hivemind splits each span into parts this big).
PART_SIZE_BYTES = 64 * 1024
DECLARE_STATE_PERIOD = 10.0  # seconds between hivemind's re-declarations that we serve our state


@dataclass
class AveragingResult:
    averaged: list[torch.Tensor]
    group_size: int
    bytes_sent: int = 0
    bytes_received: int = 0
    peers: list[str] = field(default_factory=list)
    failure: Optional[str] = None  # why the round fell back to a solo step or lost values, if it did
    needs_resync: bool = False
    group_round: int = 0  # the round the group's elected state reaches with this round (0 if unknown)
    clean: bool = True  # we received every averaged part (no span zeroed for a lost reducer)
    dropped: dict[str, str] = field(default_factory=dict)  # groupmate -> why it was left out of the round
    refused: dict[str, str] = field(default_factory=dict)  # groupmate -> why we refused its parts as a reducer
    clipped: dict[str, float] = field(default_factory=dict)  # groupmate -> the factor we scaled its parts by
    norm: float = 0.0  # the L2 norm of our pseudo-gradient, as we declared it to the group
    # seconds: "norm" (our update's norm), "copy_in"/"copy_out" (into and out of the averager's shared buffers),
    # "wait" (for the meeting and matchmaking, or until the round gave up), "allreduce" (from the group's forming to
    # our last averaged part: codec and wire, in the averager process)
    seconds: dict[str, float] = field(default_factory=dict)


def alone(delta: Sequence[torch.Tensor], failure: Optional[str] = None) -> AveragingResult:
    """The result of a round without a group: our own pseudo-gradient."""
    return AveragingResult([d.clone() for d in delta], group_size=1, failure=failure, clean=failure is None)


class Averaging(Protocol):
    """What a node needs from the network for its rounds and its state (SwarmAveraging, or SoloAveraging)."""

    longest_round: float  # the most seconds a round can take from our launch to its end (its all-reduce included)

    def average(self, delta: Sequence[torch.Tensor], meeting: float, meta: RoundMeta) -> AveragingResult: ...

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

    def agreed_state(self, me: str, mine: PeerState, others: Sequence[str], group_round: int) -> Optional[StateId]: ...

    def shutdown(self) -> None: ...


class SoloAveraging:
    """No network: the peer's own pseudo-gradient is the average (a peer alone, or the trained-alone baseline)."""

    longest_round = 0.0

    def average(self, delta: Sequence[torch.Tensor], meeting: float, meta: RoundMeta) -> AveragingResult:
        return alone(delta)

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

    def agreed_state(self, me: str, mine: PeerState, others: Sequence[str], group_round: int) -> Optional[StateId]:
        return mine.id

    def shutdown(self) -> None:
        pass


class SwarmAveraging:
    """All-reduce through hivemind with the peers that meet at the agreed time."""

    def __init__(
        self,
        dht: DHT,
        run_id: str,
        shapes: Sequence[torch.Size],
        compression: str,
        state_fn: Callable[[], tuple[dict[str, Any], list[torch.Tensor]]],
        max_steps: int,
        members: Optional[Members] = None,
        clip_multiple: float = DEFAULT_CLIP_MULTIPLE,
        fault: Optional[FaultHook] = None,
        spec: str = "",
        feedback: Optional[ErrorFeedback] = None,
    ) -> None:
        self._buffers = [torch.zeros(shape) for shape in shapes]
        self._max_steps = max_steps
        self.feedback = feedback
        timeout = allreduce_timeout(shapes, compression)
        self.longest_round = MATCHMAKING_LEAD + MEETING_GRACE + timeout
        self._averager = ExactAverager(
            self._buffers,
            dht,
            prefix=f"{run_id}_avg",
            start=True,
            min_group_size=2,
            min_matchmaking_time=MATCHMAKING_TIME,
            request_timeout=REQUEST_TIMEOUT,
            allreduce_timeout=timeout,
            next_chunk_timeout=NEXT_CHUNK_TIMEOUT,
            part_size_bytes=PART_SIZE_BYTES,
            compression=compression_for(compression),
            state_fn=state_fn,
            declare_state_period=DECLARE_STATE_PERIOD,
            members=members or Members.open(),
            max_steps=max_steps,
            codec=compression,
            clip_multiple=clip_multiple,
            fault=fault,
            spec=spec,
            error_sink=None if feedback is None else feedback.pending,
        )
        self.replace_members = self._averager.replace_members
        self.peer_id = self._averager.peer_id.to_base58()
        self._states = StateClient(dht, self._averager)
        self.publish_round = self._states.publish_round
        self.highest_round_online = self._states.highest_round_online
        self.positions = self._states.positions
        self.download_state = self._states.download_state
        self.agreed_state = self._states.agreed_state

    def average(self, delta: Sequence[torch.Tensor], meeting: float, meta: RoundMeta) -> AveragingResult:
        clock = [time.perf_counter()]
        seconds: dict[str, float] = {}

        def lap(name: str) -> None:
            now = time.perf_counter()
            seconds[name] = round(now - clock[0], 4)
            clock[0] = now

        result = self._average(delta, meeting, meta, lap, seconds)
        result.seconds = seconds
        return result

    def _average(
        self,
        delta: Sequence[torch.Tensor],
        meeting: float,
        meta: RoundMeta,
        lap: Callable[[str], None],
        seconds: dict[str, float],
    ) -> AveragingResult:
        with self._averager.get_tensors() as buffers:  # our contribution: delta, plus the residual it owes
            for buffer, d in zip(buffers, delta, strict=True):
                buffer.copy_(d)
            if self.feedback is not None:
                self.feedback.add_into(buffers)
            lap("copy_in")
            # per-tensor float32 norms, combined in double precision (a float64 copy of a 1B-parameter update would
            # cost 8 GB; reducers check declared norms with a 10% tolerance)
            norm = math.sqrt(sum(float(torch.linalg.vector_norm(b)) ** 2 for b in buffers))
            lap("norm")
            finite = math.isfinite(norm)
            if not finite:  # a lossy codec would turn NaN into finite values: contribute nothing
                logger.error("our pseudo-gradient is not finite: contributing nothing to round %d", meta.round + 1)
                meta = RoundMeta(meta.round, meta.hash, steps=0, norm=0.0)
                for buffer in buffers:
                    buffer.zero_()
            else:
                meta = RoundMeta(meta.round, meta.hash, meta.steps, norm)
        # Only members whose shared model is at one round meet: the round is part of the group key, so a partner
        # one round behind (it missed a round) is never matched with the swarm's next round, where its update,
        # computed against an older model, would be mixed into theirs; it goes alone and catches up instead.
        # (Set every round: hivemind reshuffles the bits after each group it assembles.)
        try:
            try:
                self._averager.set_group_bits(group_bits(meta.round))
                outcome = self._step(meeting, meta)
            finally:
                lap("wait")  # split below into waiting for the group and the all-reduce itself
        except AveragingBug as e:  # logged with its traceback in the averager process
            logger.error("round %d failed: %s (traceback above)", meta.round + 1, e)
            return self._alone(delta, failure=str(e))
        except NETWORK_FAILURES as e:
            reason = str(e).splitlines()[0].rstrip(": ") if str(e).strip() else type(e).__name__
            if "could not find a group" in reason:
                reason = "no other peer came to the meeting"
            logger.info("round without a group (%s): applying our own update", reason)
            return self._alone(delta, failure=reason)
        except Exception as e:
            logger.exception("averaging failed inside tapestry (a bug, not the network)")
            return self._alone(delta, failure=f"internal error in averaging: {type(e).__name__}: {e}")
        if outcome.started:
            seconds["allreduce"] = round(min(seconds["wait"], max(time.time() - outcome.started, 0.0)), 4)
            seconds["wait"] = round(seconds["wait"] - seconds["allreduce"], 4)
        with self._averager.get_tensors() as buffers:
            averaged = [b.clone() for b in buffers]
        lap("copy_out")
        if not all(torch.isfinite(a).all() for a in averaged):
            return self._alone(delta, failure="non-finite average; kept our own update")
        if self.feedback is not None:
            if not finite:  # we contributed nothing, and owe nothing
                self.feedback.reset()
            elif meta.steps > 0:
                self.feedback.sent(delta, outcome.failed_spans)
            # (no inner steps: our weight was 0, nothing of ours was averaged; we still owe the residual)
        return replace(_result(averaged, outcome, meta), norm=meta.norm)

    def _alone(self, delta: Sequence[torch.Tensor], failure: str) -> AveragingResult:
        """A round that went alone applies our whole contribution (delta plus what we owed): we owe nothing after."""
        if self.feedback is None:
            return alone(delta, failure)
        result = AveragingResult(self.feedback.contribution(delta), group_size=1, failure=failure, clean=False)
        self.feedback.reset()
        return result

    def _step(self, meeting: float, meta: RoundMeta) -> AllReduceOutcome:
        # Weighted by inner steps (at most H): a partner that came to the meeting with fewer steps moves it less.
        timeout = max(meeting - get_dht_time(), 0.0) + MEETING_GRACE
        weight = weight_for(meta.steps, self._max_steps)
        return self._averager.step(
            gather=asdict(meta), scheduled_time=meeting, weight=weight, timeout=timeout, allow_retries=False
        )

    def shutdown(self) -> None:
        self._averager.shutdown()
        self._averager.join(timeout=10)
        if self._averager.is_alive():
            self._averager.kill()


def group_bits(round_no: int) -> str:
    """The bits of hivemind's group key for a round: the round of the shared model going in, in binary."""
    return format(round_no, "b")


def allreduce_timeout(shapes: Sequence[torch.Size], compression: str) -> float:
    """ALLREDUCE_TIMEOUT, plus what a member sends and receives in a butterfly all-reduce (at most twice the coded
    model, each way) at SLOWEST_LINK."""
    values = sum(math.prod(shape) for shape in shapes)
    probe = torch.zeros(1)
    coded = 4 * values * compression_for(compression).estimate_compression_ratio(CompressionInfo.from_tensor(probe))
    return ALLREDUCE_TIMEOUT + 2 * coded / SLOWEST_LINK


def _result(averaged: list[torch.Tensor], outcome: AllReduceOutcome, meta: RoundMeta) -> AveragingResult:
    """What a completed all-reduce means for the node: the average, and whether it left us out of step."""
    states = {peer: parsed.state for peer, data in outcome.gathered.items() if (parsed := RoundMeta.parse(data))}
    elected = elected_state(states)
    failure = None
    if outcome.failed_fraction > 0:
        failure = f"{outcome.failed_fraction:.1%} of values lost their reducer (no update for them this round)"
    elif outcome.senders_lost:
        failure = f"{outcome.senders_lost} groupmates' parts never reached us"
    return AveragingResult(
        averaged=averaged,
        group_size=len(outcome.gathered),
        bytes_sent=outcome.traffic.sent,
        bytes_received=outcome.traffic.received,
        peers=sorted(outcome.gathered),
        failure=failure,
        needs_resync=elected is not None and elected != meta.state.id,
        group_round=elected.round + 1 if elected is not None else 0,
        clean=outcome.failed_fraction == 0,
        dropped=outcome.dropped,
        refused=outcome.refused,
        clipped=outcome.clipped,
    )
