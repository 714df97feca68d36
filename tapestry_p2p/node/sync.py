"""Keeping our shared state in step with the swarm: serve it, catch up when the swarm is ahead, re-sync after a round
that left us out of step with our group, and adopt a downloaded state only if it checks out.

The transport and the choice of the elected state are in `comm.statesync`; this module is the node's policy:
- on joining (`first_catch_up`): if the swarm is ahead, wait for its state rather than train from our own (a joiner
  that trains alone would only be overwritten later), unless told to start fresh;
- at every round start (`catch_up`): if peers advertise a later position (the round they reach once their round in
  flight settles, see node.rounds) and outnumber those in step with us, download the state a majority of them hold
  (an advertised round is a hint, never a reason; `peers_to_follow`); if they served it with their next round under
  way, the node takes that round's outcome as the state it ends on (`await_round`) instead of meeting alone for a
  round the swarm already averaged. A peer ahead only by rounds it averaged alone (`solo_rounds`) defers to a strict
  majority of the swarm behind it, so a split never lasts: the lone peer's rounds were its own;
- after a round (`after_round`): if some member never told us which spans it lost (`comm.losses`: otherwise every
  member zeroed the same spans), compare states with the group and download the agreed one if ours differs; a round
  we were left out of is followed by awaiting its outcome (node.rounds);
- `adopt`: well-formed, not older than asked, and hashing to what its servers announced, or it is ignored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from tapestry_p2p.comm.averaging import Averaging, AveragingResult, SoloAveraging
from tapestry_p2p.comm.statesync.client import Download
from tapestry_p2p.comm.statesync.wire import PeerState, StateId
from tapestry_p2p.training.outer import SharedModel

logger = logging.getLogger(__name__)

CATCH_UP_RETRY_SECONDS = 10.0  # a joiner that finds the swarm ahead but nobody serving its state asks again this often
AWAIT_POLL_SECONDS = 0.5  # how often a node awaiting the swarm's round asks for the state it ends on
AWAIT_CHECK_SECONDS = 2.0  # ... and how often whether any of its peers may still come to hold it


class StateSync:
    """The node's shared state as the swarm sees it. `lock` guards theta against the thread that serves it."""

    def __init__(self, shared: SharedModel, working: torch.nn.Module, lock: threading.Lock) -> None:
        self.shared, self.working, self.lock = shared, working, lock
        # called after adopting a state that replaces our progress: the round under way belongs to the model we left
        self.on_adopt: Callable[[], None] = lambda: None
        self.averaging: Averaging = SoloAveraging()
        self.clean = True  # our last round's outcome is the group's (every member reported its losses)
        self.in_flight = False  # our next round's all-reduce is under way: we serve the state before it (node.rounds)
        self.solo_rounds = 0  # rounds applied alone since we last averaged in a group or adopted a state

    @property
    def peer_id(self) -> str:
        return self.averaging.peer_id

    def share_state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """What a peer downloads from us: theta and the outer momentum (runs in hivemind's helper thread)."""
        with self.lock:
            metadata = {
                "round": self.shared.round,
                "hash": self.shared.hash(),
                "clean": self.clean,
                "in_flight": self.in_flight,
            }
            tensors = [p.detach().clone() for p in self.shared.params]
            tensors += [m.clone() for m in self.shared.momentum_buffers()]
            return metadata, tensors

    def adopt(self, download: Optional[Download], min_round: int, keep_progress: bool = False) -> bool:
        """Take a downloaded shared state if it is well-formed, at least `min_round`, and hashes to what its servers
        announced; returns whether we did. The working model restarts from it, or with `keep_progress` (the outcome
        of the swarm's round we awaited) moves with it, keeping what it trained since the state it left."""
        if download is None:
            return False
        round_no, tensors, n = download.state_id.round, download.tensors, len(self.shared.params)
        shapes_ok = len(tensors) == 2 * n and all(
            t.shape == p.shape for t, p in zip(tensors, self.shared.params + self.shared.params, strict=True)
        )
        if not shapes_ok or round_no < min_round or not all(torch.isfinite(t).all() for t in tensors):
            logger.warning("ignored a downloaded state (round %d, %d tensors): malformed or too old", round_no, n)
            return False
        with self.lock:
            before = (
                [p.detach().clone() for p in self.shared.params],
                self.shared.momentum_buffers(),
                self.shared.round,
            )
            progress = self.shared.pseudo_gradient(self.working) if keep_progress else None
            self.shared.load(tensors[:n], tensors[n:], round_no)
            if self.shared.hash() != download.state_id.hash:
                self.shared.load(*before)
                logger.warning("ignored a downloaded state whose hash differs from what its servers announced")
                return False
            if progress is None:
                self.shared.copy_into(self.working)
            else:
                self.shared.move_working(self.working, progress)
            self.clean = True  # we now hold a state the group agreed on
            self.in_flight = False
            self.solo_rounds = 0
        if not keep_progress:
            self.on_adopt()
        return True

    def catch_up(self, position: int) -> Optional[Download]:
        """Take the swarm's state if some peer is ahead of our `position` (our round, + 1 while a round of ours is in
        flight): the state a majority serves, if it is past ours, or at our round with another hash. Returns it (None
        if nothing changed); if its servers had their next round in flight (`Download.in_flight`), the caller awaits
        that round's outcome (`await_round`), also when the state they serve is the one we hold (`Download.held`)."""
        peers, min_round = self.peers_to_follow(position)
        if not peers:
            return None
        mine = StateId(self.shared.round, self.shared.hash())
        download = self.averaging.download_state(min_round=min_round, peers=peers, have=mine)
        if download is None or (download.held and not download.in_flight):
            return None
        if download.held:
            logger.info("we hold the swarm's state of round %d (model %s)", mine.round, mine.hash)
            return download
        if download.state_id.round < self.shared.round:
            logger.warning(
                "we are ahead of the swarm only by %d rounds alone: taking the state the majority holds (round %d)",
                self.solo_rounds,
                download.state_id.round,
            )
        if not self.adopt(download, min_round):
            return None
        logger.info(
            "caught up with the swarm at round %d (model %s), downloaded %.1f MB from %d peers in %.2fs (%.1f MB/s)",
            self.shared.round,
            download.state_id.hash,
            download.nbytes / 1e6,
            len(download.servers),
            download.seconds,
            download.nbytes / 1e6 / max(download.seconds, 1e-9),
        )
        return download

    def peers_ahead(self, position: int) -> list[str]:
        """The peers ahead of us to catch up from (see `peers_to_follow`)."""
        peers, min_round = self.peers_to_follow(position)
        return peers if min_round >= self.shared.round else []

    def peers_to_follow(self, position: int) -> tuple[list[str], int]:
        """The peers whose state to take, and the oldest round we accept from them; ([], 0) if we stay as we are.

        Peers advertising a later position than ours, if they outnumber the peers level with us: a minority claiming
        to be ahead of peers in step with us wins nothing, and peers behind us have no say (a partner resuming from an
        old checkpoint must not keep two others that split apart from agreeing). Or, if we are ahead only by rounds we
        applied alone (`solo_rounds`), the peers behind us within that lead, if they are a strict majority of the
        swarm (us included). Among the peers chosen, the state a majority of them holds is taken (`download_state`)."""
        positions = self.averaging.positions()
        ahead = sorted(peer for peer, theirs in positions.items() if theirs > position)
        level = sum(theirs == position for theirs in positions.values())
        if len(ahead) > level:
            return ahead, self.shared.round
        behind = {p: theirs for p, theirs in positions.items() if position - self.solo_rounds <= theirs < position}
        if self.solo_rounds and 2 * len(behind) > len(positions) + 1:
            return sorted(behind), min(behind.values()) - 1  # (a peer with a round in flight serves the one before)
        return [], 0

    def first_catch_up(self, stop: threading.Event, start_fresh: bool) -> tuple[str, Optional[Download]]:
        """On joining: catch up with the swarm if it is ahead, waiting for a server if there is none yet. Returns
        `caught up` (with what we adopted), `in step` (nobody ahead), `alone` (no other peer advertises a state) or
        `fresh`/`stopped`."""
        while not stop.is_set():
            ahead = self.averaging.highest_round_online()
            if ahead <= self.shared.round:
                return ("alone" if ahead < 0 else "in step"), None
            download = self.catch_up(self.shared.round)
            if download is not None:
                return "caught up", download
            if start_fresh:
                logger.warning("the swarm is at round %d but nobody served its state: training from ours", ahead)
                return "fresh", None
            logger.warning(
                "the swarm is at round %d but nobody served its state; asking again in %.0fs "
                "(pass --start-fresh to train from our own state instead)",
                ahead,
                CATCH_UP_RETRY_SECONDS,
            )
            stop.wait(CATCH_UP_RETRY_SECONDS)
        return "stopped", None

    def await_round(self, round_no: int, peers: list[str], stop: threading.Event) -> Optional[Download]:
        """The state the swarm's round `round_no` ends on, from `peers` (who average it), once a majority of them hold
        it; None if it does not come within the longest a round can take, they moved past it, or none of them still
        has the round in flight (the group failed too, or split: nobody is left to settle it)."""
        deadline = time.monotonic() + self.averaging.longest_round
        checked = -AWAIT_CHECK_SECONDS
        while not stop.is_set() and time.monotonic() < deadline:
            download = self.averaging.download_state(min_round=round_no, peers=peers)
            if download is not None:
                return download if download.state_id.round == round_no else None
            if time.monotonic() - checked >= AWAIT_CHECK_SECONDS:
                checked = time.monotonic()
                if not self.averaging.may_reach(round_no, peers):
                    return None
            stop.wait(AWAIT_POLL_SECONDS)
        return None

    @staticmethod
    def out_of_step(result: AveragingResult) -> bool:
        """Whether a round may have left us out of step with our group: some member never told us what it lost."""
        return result.group_size > 1 and result.left_out is None and not result.clean

    def after_round(self, result: AveragingResult) -> bool:
        """Re-sync if the round may have left us out of step with our group; returns whether we downloaded."""
        self.clean = result.clean
        if result.left_out is None:
            self.solo_rounds = self.solo_rounds + 1 if result.group_size == 1 else 0
        if not self.out_of_step(result):
            return False
        others = [p for p in result.members if p != self.peer_id]
        mine = PeerState(self.shared.round, self.shared.hash(), self.clean)
        agreed = self.averaging.agreed_state(self.peer_id, mine, others, result.group_round)
        if agreed is None or agreed == mine.id:
            return False
        download = self.averaging.download_state(min_round=mine.round, peers=others, want=agreed)
        resynced = self.adopt(download, mine.round)
        if resynced:
            logger.warning("round %d left us out of step with the group: re-synced from it", self.shared.round)
        return resynced
