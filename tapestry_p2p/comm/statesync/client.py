"""State sync as a node asks for it: who is ahead, which state to download, and what a group agreed on after a round.

Peers advertise their round as hivemind's state-sharing priority (under `StateTransport.advertised_key`, one key per
schema); a node that sees a later round advertised asks every advertiser (members only, in a consortium) for its state
info, adopts the state a majority of them hold (`policy.elected_state`; an advertised round is only a hint, never a
reason) and downloads it in slices from every peer holding it (`transport.py`).

Every call here has an overall deadline, and whatever a remote peer makes a call raise is logged and turned into
"nothing downloaded": a peer can delay a download, never stop the node (S3 in the security review).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from hivemind.dht import DHT
from hivemind.p2p import PeerID

from tapestry_p2p.comm.statesync.policy import agreed_after_failure, elected_state
from tapestry_p2p.comm.statesync.wire import PeerState, StateId

logger = logging.getLogger(__name__)

STATE_TIMEOUT = 10.0  # a serving peer silent for this long (per message) is dropped from a state download
AGREEMENT_WAIT = 5.0  # after a failed round, how long to wait for groupmates to finish it before comparing states
AGREEMENT_POLL = 0.5  # seconds between two comparisons while waiting
POSITIONS_PERIOD = 5.0  # seconds between two background reads of the positions peers advertise
DHT_ERRORS = (OSError, EOFError, RuntimeError, TimeoutError)  # the DHT process is gone, slow or shutting down


@dataclass
class Download:
    """A shared state downloaded from peers: which one, its tensors, and who served them."""

    state_id: StateId
    tensors: list[torch.Tensor]
    servers: list[str]
    seconds: float = 0.0  # how long the transfer took
    # those of its servers whose next round's all-reduce was under way (--overlap): the swarm meets next for round
    # `state_id.round + 2`, and they are the peers that will hold the state that round ends on
    in_flight: list[str] = field(default_factory=list)
    held: bool = False  # we hold this state already (`download_state(have=...)`): nothing was fetched

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class StateClient:
    """Finds and downloads the swarm's shared state through one ExactAverager (see comm.averager). The positions peers
    advertise are read by a background thread (a DHT read can take a second on a slow link; a node reads them at every
    round start)."""

    def __init__(self, dht: DHT, averager: Any) -> None:
        self._dht, self._averager = dht, averager
        self._positions: dict[str, float] = {}
        self._read_once = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch_positions, name="positions", daemon=True)
        self._thread.start()

    def _watch_positions(self) -> None:
        while not self._closed.is_set():
            try:
                self._positions = self._advertised()
            except DHT_ERRORS as e:
                logger.debug("positions: DHT unavailable (%r)", e)
            self._read_once.set()
            self._closed.wait(POSITIONS_PERIOD)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=POSITIONS_PERIOD + 10)

    def publish_round(self, round_no: int) -> None:
        """Peers download state from whoever is furthest along: advertise our round as the priority (with --overlap,
        the round we reach once our round in flight settles: the node's position, see node.rounds). Our state is served
        from the first call on (a node first catches up with the swarm, and then advertises what it holds)."""
        if not self._averager.allow_state_sharing:
            self._averager.allow_state_sharing = True
        self._averager.state_sharing_priority = float(round_no)

    def _advertised(self) -> dict[str, float]:
        """Peer id -> round, for every peer of our schema that declares it can serve its state."""
        found = self._dht.get(self._averager.advertised_key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        rounds = {}
        for subkey, entry in found.value.items():
            value = getattr(entry, "value", None)
            if isinstance(subkey, bytes) and isinstance(value, (int, float)) and math.isfinite(value):
                rounds[PeerID(subkey).to_base58()] = value
        rounds.pop(self._averager.peer_id.to_base58(), None)
        return rounds

    def positions(self) -> dict[str, int]:
        """Peer id -> the round it advertises, for every other peer of our schema serving its state (as read at most
        POSITIONS_PERIOD seconds ago)."""
        self._read_once.wait(timeout=30)
        return {peer: int(value) for peer, value in self._positions.items()}

    def highest_round_online(self) -> int:
        """The highest round another peer of the run advertises for state sharing (-1 if none does)."""
        return max(self.positions().values(), default=-1)

    def download_state(
        self,
        min_round: int,
        peers: Optional[Sequence[str]] = None,
        want: Optional[StateId] = None,
        have: Optional[StateId] = None,
    ) -> Optional[Download]:
        """The state `want` (default: the one a majority of `peers` hold, if it is `min_round` or later) among `peers`
        (default: every other advertiser), downloaded in slices from all peers that hold it; None if there is no such
        state, nobody serves it, or the download failed. If it is `have` (ours), nothing is fetched (`held`)."""
        try:
            return self._download(min_round, peers, want, have)
        except Exception as e:  # noqa: BLE001 (a remote peer must not stop the node: whatever it caused, log it)
            logger.warning("state download failed (%s: %s); carrying on with our own state", type(e).__name__, e)
            return None

    def _download(
        self, min_round: int, peers: Optional[Sequence[str]], want: Optional[StateId], have: Optional[StateId]
    ) -> Optional[Download]:
        if peers is None:
            peers = sorted(self._advertised())
        if not peers:
            return None
        infos = self._averager.state_infos(peers, STATE_TIMEOUT)
        target = elected_state({p: i.state for p, i in infos.items()}) if want is None else want
        if target is None or target.round < min_round or not any(info.id == target for info in infos.values()):
            if want is None and any(info.round >= min_round for info in infos.values()):
                logger.info("peers are ahead, but no state is held by a majority of the %d that answered", len(infos))
            return None
        servers = sorted(p for p, info in infos.items() if info.id == target)
        in_flight = [server for server in servers if infos[server].in_flight]
        if target == have:
            return Download(target, [], servers, in_flight=in_flight, held=True)
        logger.info("downloading the state of round %d (%s) from %d peers", target.round, target.hash, len(servers))
        started = time.perf_counter()
        fetched = self._averager.fetch_state(servers, infos[servers[0]], STATE_TIMEOUT)
        if fetched is None:
            return None
        return Download(target, fetched[0], fetched[1], time.perf_counter() - started, in_flight)

    def may_reach(self, round_no: int, peers: Sequence[str]) -> bool:
        """Whether one of `peers` may still come to hold round `round_no`: it holds the round before, with a round of
        its own in flight (a peer awaiting another's outcome has none, and a peer past the round will not go back)."""
        try:
            infos = self._averager.state_infos(peers, STATE_TIMEOUT)
        except Exception as e:  # noqa: BLE001 (a remote peer must not stop the node: whatever it caused, log it)
            logger.warning("asking peers for their state failed (%s: %s)", type(e).__name__, e)
            return False
        return any(info.round == round_no - 1 and info.in_flight for info in infos.values())

    def agreed_state(self, me: str, mine: PeerState, others: Sequence[str], group_round: int) -> Optional[StateId]:
        """The state our group converged on after the round we just finished (`mine`; `group_round` is the round the
        group reached), waiting up to AGREEMENT_WAIT seconds for groupmates that have not reached it yet (see
        `policy.agreed_after_failure`)."""
        deadline = time.monotonic() + AGREEMENT_WAIT
        target_round = max(mine.round, group_round)
        finished: dict[str, PeerState] = {}
        while True:
            try:
                infos = self._averager.state_infos(others, STATE_TIMEOUT)
            except Exception as e:  # noqa: BLE001 (a remote peer must not stop the node: whatever it caused, log it)
                logger.warning("comparing states with the group failed (%s: %s)", type(e).__name__, e)
                return None
            finished = {p: i.state for p, i in infos.items() if i.round >= target_round}
            if len(finished) == len(infos) or time.monotonic() > deadline:
                break
            time.sleep(AGREEMENT_POLL)
        return agreed_after_failure({**finished, me: mine})
