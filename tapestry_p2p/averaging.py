"""One outer round's communication: all-reduce a pseudo-gradient with whoever meets, or keep it when alone.

`SwarmAveraging` wraps the bit-exact `ExactAverager` (hivemind matchmaking + butterfly all-reduce) around a fixed set
of flat delta buffers; `SoloAveraging` has the same interface and no network (the trained-alone baseline). Neither
knows what the tensors are: the node hands in a list of tensors and gets a list back.

The average is weighted by each member's inner steps this round (see `average`).

Agreement: every peer gathers `{round, hash}` from its group. If the group's members disagree on the shared model
(a peer missed a round, or crashed and came back), the canonical state is the one held by most members of the
highest round (ties: the smallest peer id, see `statesync.canonical_state`); `needs_resync` tells the other members
to download it afterwards. A round that lost a part (a groupmate died mid-stream) ends with a second comparison,
`agreed_state`, among the members that finished it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from tapestry_p2p.allreduce import ExactAverager, RoundOutcome
from tapestry_p2p.codec import compression_for
from tapestry_p2p.rounds import MATCHMAKING_LEAD
from tapestry_p2p.statesync import StateId, agreed_after_failure, canonical_state

logger = logging.getLogger(__name__)

MATCHMAKING_TIME = MATCHMAKING_LEAD - 0.5  # hivemind's min_matchmaking_time: how long a leader waits for followers
REQUEST_TIMEOUT = 1.0  # hivemind's request_timeout for one matchmaking request
MEETING_GRACE = 2.0  # after the meeting time, how long a peer keeps looking for its group before going alone
ALLREDUCE_TIMEOUT = 60.0  # the longest an all-reduce may take once the group is formed, in seconds
NEXT_CHUNK_TIMEOUT = 10.0  # a groupmate silent for this long is dropped from the round
PART_SIZE_BYTES = 64 * 1024
STATE_TIMEOUT = 10.0  # a serving peer silent for this long (per message) is dropped from a state download
AGREEMENT_WAIT = 5.0  # after a failed round, how long to wait for groupmates to finish it before comparing states
ZERO_STEP_WEIGHT = 1e-6  # smaller parts balance the reducers' load better on small models


@dataclass
class Download:
    """A shared state downloaded from peers: its (round, hash), the tensors, and who served them."""

    state: StateId
    tensors: List[torch.Tensor]
    servers: List[str]


@dataclass
class RoundResult:
    averaged: List[torch.Tensor]
    group_size: int
    bytes_sent: int = 0
    bytes_received: int = 0
    peers: List[str] = field(default_factory=list)
    failure: Optional[str] = None  # why the round fell back to a solo step, if it did
    needs_resync: bool = False
    group_round: int = 0  # the round the group's canonical members reach with this round (0 if unknown)
    clean: bool = True  # we received every averaged part (no span zeroed for a lost reducer)


class SoloAveraging:
    """No network: the peer's own pseudo-gradient is the average (a peer alone, or the trained-alone baseline)."""

    def average(self, delta: Sequence[torch.Tensor], meeting: float, gather: Dict[str, Any]) -> RoundResult:
        return RoundResult(averaged=[d.clone() for d in delta], group_size=1)

    def publish_round(self, round_no: int) -> None:
        pass

    def highest_round_online(self) -> int:
        return -1

    def download_state(self, min_round: int, peers=None, want=None) -> Optional[Download]:
        return None

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
        state_fn: Callable[[], Tuple[Dict[str, Any], List[torch.Tensor]]],
    ):
        self._dht = dht
        self._buffers = [torch.zeros(shape) for shape in shapes]
        self._averager = ExactAverager(
            self._buffers,
            dht,
            prefix=f"{run_id}_avg",
            start=True,
            min_group_size=2,
            min_matchmaking_time=MATCHMAKING_TIME,
            request_timeout=REQUEST_TIMEOUT,
            allreduce_timeout=ALLREDUCE_TIMEOUT,
            next_chunk_timeout=NEXT_CHUNK_TIMEOUT,
            part_size_bytes=PART_SIZE_BYTES,
            compression=compression_for(compression),
            state_fn=state_fn,
            declare_state_period=10,
        )

    def average(self, delta: Sequence[torch.Tensor], meeting: float, gather: Dict[str, Any]) -> RoundResult:
        with self._averager.get_tensors() as buffers:
            for buffer, d in zip(buffers, delta):
                buffer.copy_(d)
        timeout = max(meeting - get_dht_time(), 0.0) + MEETING_GRACE
        # Weighted by inner steps: a partner that joined the meeting after fewer steps moves the average less.
        # A peer with no steps still takes part (so it ends the round with the group's model) at a negligible
        # weight, which keeps the total positive even if every member of a group arrived empty-handed.
        weight = float(max(gather["steps"], ZERO_STEP_WEIGHT))
        try:
            outcome: RoundOutcome = self._averager.step(
                gather=gather, scheduled_time=meeting, weight=weight, timeout=timeout, allow_retries=False
            )
        except Exception as e:  # hivemind raises several types; all mean "no group this round"
            reason = str(e).splitlines()[0].rstrip(": ") if str(e).strip() else type(e).__name__
            if "could not find a group" in reason:
                reason = "no other peer came to the meeting"
            logger.info("round without a group (%s): applying our own update", reason)
            return RoundResult(averaged=[d.clone() for d in delta], group_size=1, failure=reason, clean=False)
        with self._averager.get_tensors() as buffers:
            averaged = [b.clone() for b in buffers]
        if not all(torch.isfinite(a).all() for a in averaged):
            return RoundResult(
                [d.clone() for d in delta], 1, failure="non-finite average; kept our own update", clean=False
            )
        canonical = canonical_state(outcome.gathered)
        mine = (gather["round"], gather["hash"])
        failure = None
        if outcome.failed_fraction > 0:
            failure = f"{outcome.failed_fraction:.1%} of values lost their reducer (no update for them this round)"
        elif outcome.senders_lost:
            failure = f"{outcome.senders_lost} groupmates' parts never reached us"
        return RoundResult(
            averaged=averaged,
            group_size=len(outcome.gathered),
            bytes_sent=outcome.bytes_sent,
            bytes_received=outcome.bytes_received,
            peers=sorted(outcome.gathered),
            failure=failure,
            needs_resync=canonical is not None and canonical != mine,
            group_round=canonical[0] + 1 if canonical is not None else 0,
            clean=outcome.failed_fraction == 0,
        )

    def publish_round(self, round_no: int) -> None:
        """Peers download state from whoever is furthest along: advertise our round as the priority."""
        self._averager.state_sharing_priority = float(round_no)

    def _advertised(self) -> Dict[str, float]:
        """Peer id -> round, for every peer that declares it can serve its state (hivemind's `all_averagers` key)."""
        found = self._dht.get(f"{self._averager.prefix}.all_averagers", latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        rounds = {}
        for subkey, entry in found.value.items():
            value = getattr(entry, "value", None)
            if isinstance(subkey, bytes) and isinstance(value, (int, float)) and math.isfinite(value):
                rounds[PeerID(subkey).to_base58()] = value
        rounds.pop(self._averager.peer_id.to_base58(), None)
        return rounds

    def highest_round_online(self) -> int:
        """The highest round another peer of the run advertises for state sharing (-1 if none does).

        We set the advertised priority to our round (`publish_round`): checking it first saves asking for a state
        that is no newer than ours.
        """
        return int(max(self._advertised().values(), default=-1))

    def download_state(
        self, min_round: int, peers: Optional[Sequence[str]] = None, want: Optional[StateId] = None
    ) -> Optional[Download]:
        """The state `want` (default: the canonical one) among `peers` (default: every peer advertising `min_round` or
        later), downloaded in slices from all peers that hold it; None if nobody serves it, or the download failed."""
        if peers is None:
            peers = [peer for peer, r in self._advertised().items() if r >= min_round]
        if not peers:
            return None
        infos = {p: i for p, i in self._averager.state_infos(peers, STATE_TIMEOUT).items() if i.round >= min_round}
        target = canonical_state(infos) if want is None else want
        if target is None or not any(info.id == target for info in infos.values()):
            return None
        servers = sorted(p for p, info in infos.items() if info.id == target)
        logger.info("downloading the state of round %d (%s) from %d peers", target[0], target[1], len(servers))
        fetched = self._averager.fetch_state(servers, infos[servers[0]], STATE_TIMEOUT)
        if fetched is None:
            return None
        return Download(state=target, tensors=fetched[0], servers=fetched[1])

    def agreed_state(
        self, me: str, mine: StateId, clean: bool, others: Sequence[str], group_round: int
    ) -> Optional[StateId]:
        """The state our group converged on after the round we just finished (`mine` is ours, `clean` whether our
        round lost no part; `group_round` the round the group reached), waiting up to AGREEMENT_WAIT seconds for
        groupmates that have not reached it yet (see `statesync.agreed_after_failure`)."""
        deadline = time.monotonic() + AGREEMENT_WAIT
        target_round = max(mine[0], group_round)
        while True:
            infos = self._averager.state_infos(others, STATE_TIMEOUT)
            finished = {p: i for p, i in infos.items() if i.round >= target_round}
            if len(finished) == len(infos) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        states = {p: {"round": i.round, "hash": i.hash, "clean": i.clean} for p, i in finished.items()}
        states[me] = {"round": mine[0], "hash": mine[1], "clean": clean}
        return agreed_after_failure(states)

    def shutdown(self) -> None:
        self._averager.shutdown()
        self._averager.join(timeout=10)
        if self._averager.is_alive():
            self._averager.kill()
