"""Keeping our shared state in step with the swarm: serve it, catch up when the swarm is ahead, re-sync after a round
that left us out of step with our group, and adopt a downloaded state only if it checks out.

The transport and the choice of the elected state are in `comm.statesync`; this module is the node's policy:
- on joining (`first_catch_up`): if the swarm is ahead, wait for its state rather than train from our own (a joiner
  that trains alone would only be overwritten later), unless told to start fresh;
- at every round start (`catch_up`): if peers advertise a later position (the round they reach once their round in
  flight settles, see node.overlap) and outnumber those in step with us, download the state a majority of them hold
  (an advertised round is a hint, never a reason; `peers_ahead`); if they served it with their next round under way,
  the node takes that round's outcome as the state it ends on (`await_round`) instead of meeting alone for a round
  the swarm already averaged;
- after a round (`after_round`): if we disagreed with the group going in, or values lost their reducer, compare
  states with the group and download the agreed one if ours differs;
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
AWAIT_POLL_SECONDS = 0.5  # how often a node waiting for the swarm's round in flight asks for the state it ends on


class StateSync:
    """The node's shared state as the swarm sees it. `lock` guards theta against the thread that serves it."""

    def __init__(
        self,
        shared: SharedModel,
        working: torch.nn.Module,
        lock: threading.Lock,
        on_adopt: Callable[[], None],
    ) -> None:
        self.shared, self.working, self.lock, self.on_adopt = shared, working, lock, on_adopt
        self.averaging: Averaging = SoloAveraging()
        self.peer_id = "solo"
        self.clean = True  # our last round received every averaged part (peers comparing states ask for it)
        self.in_flight = False  # our next round's all-reduce is under way: we serve the state before it (node.overlap)

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
        if not keep_progress:
            self.on_adopt()
        return True

    def catch_up(self, position: int) -> Optional[Download]:
        """Take the swarm's state if some peer is ahead of our `position` (our round, + 1 while a round of ours is in
        flight): the state a majority serves, if it is past ours, or at our round with another hash. Returns it (None
        if nothing changed); if its servers had their next round in flight (`Download.in_flight`), the caller awaits
        that round's outcome (`await_round`), also when the state they serve is the one we hold (`Download.held`)."""
        ahead = self.peers_ahead(position)
        if not ahead:
            return None
        mine = StateId(self.shared.round, self.shared.hash())
        download = self.averaging.download_state(min_round=self.shared.round, peers=ahead, have=mine)
        if download is None or (download.held and not download.in_flight):
            return None
        if download.held:
            logger.info("we hold the swarm's state of round %d (model %s)", mine.round, mine.hash)
            return download
        if not self.adopt(download, self.shared.round):
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

    def swarm_ahead(self, position: int) -> bool:
        """Whether some peer advertises a later position than ours (a hint: what we adopt is what a majority holds)."""
        return self.averaging.highest_round_online() > position

    def peers_ahead(self, position: int) -> list[str]:
        """The peers to catch up from: those advertising a later position than ours, if they outnumber the peers
        level with us (else none). Peers behind us have no say (a partner resuming from an old checkpoint must not
        keep two others that split apart from agreeing), and a minority claiming to be ahead of peers in step with us
        wins nothing; among those ahead, the state a majority of them holds is the one taken (`download_state`)."""
        positions = self.averaging.positions()
        ahead = sorted(peer for peer, theirs in positions.items() if theirs > position)
        level = sum(theirs == position for theirs in positions.values())
        return ahead if len(ahead) > level else []

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
        """The state the swarm's round `round_no` ends on (it was in flight for `peers` when we caught up), once a
        majority of them hold it; None if it does not come within the longest a round can take, or they moved past
        it. (Only the peers that average it are asked: another node awaiting it holds the state before it.)"""
        deadline = time.monotonic() + self.averaging.longest_round
        # (a peer's advertised position outlives it by at most hivemind's declaration period: once no peer
        # advertises the round, nobody is left to settle it)
        while not stop.is_set() and time.monotonic() < deadline and self.swarm_ahead(round_no - 1):
            download = self.averaging.download_state(min_round=round_no, peers=peers)
            if download is not None:
                return download if download.state_id.round == round_no else None
            stop.wait(AWAIT_POLL_SECONDS)
        return None

    @staticmethod
    def out_of_step(result: AveragingResult) -> bool:
        """Whether a round may have left us out of step with our group: we disagreed with it going in, or it failed."""
        return result.group_size > 1 and (result.needs_resync or result.failure is not None)

    def after_round(self, result: AveragingResult) -> bool:
        """Re-sync if the round may have left us out of step with our group; returns whether we downloaded."""
        self.clean = result.clean
        if not self.out_of_step(result):
            return False
        others = [p for p in result.peers if p != self.peer_id]
        mine = PeerState(self.shared.round, self.shared.hash(), self.clean)
        agreed = self.averaging.agreed_state(self.peer_id, mine, others, result.group_round)
        if agreed is None or agreed == mine.id:
            return False
        download = self.averaging.download_state(min_round=mine.round, peers=others, want=agreed)
        resynced = self.adopt(download, mine.round)
        if resynced:
            logger.warning("round %d left us out of step with the group: re-synced from it", self.shared.round)
        return resynced
