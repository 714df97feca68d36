"""Rounds in flight: a round's all-reduce runs in a background thread from its launch at the meeting until it is
settled, at one of three named points: between two inner steps once it is done (`settle_if_done`), at the next
meeting, which waits for it, and at stop. A blocking round (`--no-overlap`) is the same rule with the settle right
after the launch.

The rule (a one-round-delayed outer step that keeps local progress, as in "eager updates" for DiLoCo):

    at the meeting of round r, a partner launches round r's all-reduce of delta_r = theta - working (its progress
    since round r-1 was launched), with theta's round and hash in its declaration, and trains round r+1 on from the
    working model as it is. When round r settles, it applies the average:
        progress = theta - working - delta_r          (what it trained since the launch)
        theta    = OuterStep(theta, average_r)
        working  = theta - progress
    (`SharedModel.apply_keeping_progress`; in a blocking round progress is exactly zero).

theta changes only by averages, in round order, on every member: it stays bit-identical across the group. What a
settle does, by the round's outcome (`comm.averaging.AveragingResult`):
- averaged, or alone (nobody else declared the round): the outer step above;
- left out of the round's group (declared late, state differs, silent, no agreement, a failed all-reduce): nothing
  is applied, so nobody diverges; delta_r stays in the working model as progress, and we take the state the round
  ends on from the peers that hold it (`Awaited`, in the background: it is now the round in flight), keeping that
  progress, which our next round sends. If nobody comes to hold that state (the group failed too), we train on from
  the state we have, and meet for the same round again.
- an awaited state (a round we were left out of, or the swarm's round in flight when we caught up): adopted keeping
  our progress (`SharedModel.move_working`).

A node's *position* is theta's round, + 1 while a round is in flight (ours or awaited); its next meeting is for round
position + 1, and it advertises its position to the swarm (node.sync decides catch-up from the positions).

Each settled round of ours ends in `finish` (re-sync if it lost parts, checkpoint, record): the record of round r is
written when r settles, and covers the time since the previous record.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

import torch

from tapestry_p2p.comm.averaging import Averaging, AveragingResult, RoundMeta
from tapestry_p2p.comm.statesync.client import Download
from tapestry_p2p.node.metrics import Phases
from tapestry_p2p.node.sync import StateSync

logger = logging.getLogger(__name__)


@dataclass
class Launched:
    """Our round whose all-reduce is in flight."""

    future: concurrent.futures.Future[AveragingResult]
    meta: RoundMeta  # the shared model it was computed against, and its inner steps
    delta: list[torch.Tensor]  # what we contributed (kept: the working model's progress is measured past it)
    losses: list[float]  # its inner steps' losses
    training_seconds: float
    blocking: bool  # settled right after its launch (--no-overlap): its seconds are the round's own


@dataclass
class Awaited:
    """A round of the swarm's whose outcome we take as the state it ends on (we were left out, or caught up while it
    was in flight)."""

    future: concurrent.futures.Future[Optional[Download]]
    round: int  # the round that state completes


Entry = Union[Launched, Awaited]
Finish = Callable[[AveragingResult, Launched], None]


class RoundPipeline:
    """At most one round in flight, ours (`launch`) or the swarm's (`await_round`); `settle` applies it."""

    def __init__(self, sync: StateSync, stop: threading.Event, finish: Finish) -> None:
        """`finish(result, launched)` ends each of our settled rounds (re-sync, checkpoint, record; see node.Node)."""
        self.sync, self.stop, self.finish = sync, stop, finish
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tapestry-round")
        self.entry: Optional[Entry] = None
        self.phases = Phases()  # where the time goes until the next record

    @property
    def averaging(self) -> Averaging:
        return self.sync.averaging

    @property
    def position(self) -> int:
        """The round our shared model reaches once the round in flight settles (what we advertise; our next meeting is
        `position + 1`)."""
        return self.sync.shared.round + (self.entry is not None)

    @property
    def launched(self) -> bool:
        """Whether a round of ours is in flight (an awaited round of the swarm's is not ours: it has no record)."""
        return isinstance(self.entry, Launched)

    def done(self) -> bool:
        return self.entry is not None and self.entry.future.done()

    # ---- starting ----

    def launch(
        self, meeting: float, delta: list[torch.Tensor], meta: RoundMeta, losses: list[float], seconds: float
    ) -> None:
        """Start our round's all-reduce in the background; training goes on from the working model as it is."""
        assert self.entry is None, "one round in flight at a time"
        averaging = self.averaging
        with self.sync.lock:
            self.sync.in_flight = True
        future = self._executor.submit(averaging.average, delta, meeting, meta)
        self.entry = Launched(future, meta, delta, losses, seconds, blocking=False)
        averaging.publish_round(self.position)

    def await_round(self, round_no: int, peers: list[str]) -> None:
        """Take, in the background, the state the swarm's round `round_no` ends on, from `peers` (who will hold it)."""
        assert self.entry is None, "one round in flight at a time"
        self.entry = Awaited(self._executor.submit(self.sync.await_round, round_no, peers, self.stop), round_no)
        self.averaging.publish_round(self.position)

    # ---- settling (at the named points only) ----

    def settle_if_done(self) -> None:
        if self.done():
            self.settle()

    def settle(self, blocking: bool = False, our_round_only: bool = False) -> None:
        """Wait for the round in flight and apply it (see the module docstring); `blocking`: it was launched just now
        and waited for at once (its time is the round's own, not background time); `our_round_only`: an awaited
        round of the swarm's is settled only if it is done (a meeting waits for our own round, not for downloads)."""
        if self.entry is None or (our_round_only and isinstance(self.entry, Awaited) and not self.done()):
            return
        with self.phases("wait"):
            self.entry.future.exception()  # waits until it is done
        entry, self.entry = self.entry, None
        if isinstance(entry, Awaited):
            self._take_awaited(entry)
            return
        entry.blocking = blocking
        result = entry.future.result()
        for name, seconds in result.seconds.items():  # a launched round's seconds overlapped our compute
            self.phases.add(name if blocking or name != "wait" else "background_wait", seconds)
        if result.left_out is None:
            with self.phases("outer_step"), self.sync.lock:
                self.sync.shared.apply_keeping_progress(result.averaged, self.sync.working, entry.delta)
                self.sync.in_flight = False
        else:
            with self.sync.lock:
                self.sync.in_flight = False
        self.finish(result, entry)
        self.phases = Phases()
        if result.left_out is not None:
            self._follow(result, entry)

    def _follow(self, result: AveragingResult, launched: Launched) -> None:
        """Left out of round r: take the state r ends on from whoever holds it (our update stays as progress)."""
        if not result.others:
            self.averaging.publish_round(self.position)
            return
        logger.info(
            "left out of round %d (%s): taking the state it ends on from %d peers",
            launched.meta.round + 1,
            result.left_out,
            len(result.others),
        )
        self.await_round(launched.meta.round + 1, result.others)

    def _take_awaited(self, awaited: Awaited) -> None:
        """Adopt the state an awaited round ended on, keeping our progress; if it did not come, train on from ours."""
        download = awaited.future.result()
        if self.sync.adopt(download, awaited.round, keep_progress=True):
            logger.info("took the swarm's round %d (model %s)", awaited.round, self.sync.shared.hash())
        else:
            logger.warning(
                "the swarm's round %d did not settle where we could download it: training on from round %d",
                awaited.round,
                self.sync.shared.round,
            )
        self.averaging.publish_round(self.position)

    def drop(self) -> None:
        """Wait for the round in flight and forget it (we adopted another state)."""
        if self.entry is not None:
            self.entry.future.exception()
            self.entry = None
            with self.sync.lock:
                self.sync.in_flight = False

    def close(self) -> None:
        self._executor.shutdown(wait=True)
