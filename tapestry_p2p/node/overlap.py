"""Overlapped rounds (`--overlap`): round r's all-reduce runs in the background while round r+1's inner steps run.

The rule (a one-round-delayed outer step that keeps local progress, as in "eager updates" for DiLoCo):

    at the meeting of round r, a partner launches round r's all-reduce of delta_r = theta - working (its progress
    since round r-1 was launched), with theta's round and hash as its group metadata, and trains round r+1 on from
    the working model as it is (no reset to theta). As soon as round r's all-reduce is done (between two inner
    steps; at the latest at round r+1's meeting, which waits for it), it applies the average:
        progress = theta - working - delta_r          (what it trained since the launch)
        theta    = OuterStep(theta, average_r)
        working  = theta - progress
    (`SharedModel.apply_keeping_progress`).

theta changes only by averages, in round order, on every member: it stays bit-identical across the swarm, as with
blocking rounds, whenever the average is applied. A blocking round is the same rule with the wait right after the
launch (progress is then zero and the working model restarts from theta). A partner's own progress shows in its
working model at once, its groupmates' once their round settles (at most one round later).

Staying in step: a peer's *position* is theta's round, + 1 while a round is in flight; its next meeting is for round
position + 1, and it advertises its position to the swarm. Only peers whose theta is at one round meet (the round is
part of the group key, see comm.averaging), so a peer one round behind never mixes an update computed against an
older model into the swarm's average: it goes alone, and catches up at its next round start, when it sees a later
position advertised. A peer that catches up while the swarm's round r+1 is in flight downloads the settled state of
round r and, since its servers say their next round is under way, *awaits* round r+1 (`Awaited`): in the background
it downloads the state r+1 ends on once a majority holds it, and adopts it keeping the progress it trained since
(`SharedModel.move_working`), at the latest at its own next meeting, which is the swarm's (r+2). Without this, a peer
catching up in a swarm whose all-reduce outlasts its compute would always land one round behind.

Churn, catch-up and checkpoints: a checkpoint is written when a round settles (nothing is then in flight; the
working model's progress since is not yet sent, and is sent with the next round after a resume). A partner that
adopts another peer's state first waits for its round in flight and discards it. On stop, the round in flight is
waited for and applied before the final checkpoint.

Each round's record is written when the round settles: its loss and inner steps are its own; `round_seconds`,
`compute_seconds` and `wait_seconds` cover the time since the previous record (the compute that overlapped it and
the time blocked on it); `allreduce_seconds` is its all-reduce, in the background.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

import torch

from tapestry_p2p.comm.averaging import AveragingResult
from tapestry_p2p.comm.statesync.client import Download


@dataclass
class Launched:
    """Our round whose all-reduce is in flight."""

    future: concurrent.futures.Future[AveragingResult]
    delta: list[torch.Tensor]  # what we contributed (kept: the working model's progress is measured past it)
    losses: list[float]  # its inner steps' losses
    training_seconds: float


@dataclass
class Awaited:
    """The swarm's round that was in flight when we caught up: its outcome comes as the state it ends on."""

    future: concurrent.futures.Future[Optional[Download]]
    round: int  # the round that state completes


class InFlight:
    """At most one round in flight, ours or the swarm's: run it in a background thread, wait for it, or drop it."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tapestry-round")
        self.round: Optional[Union[Launched, Awaited]] = None

    def launch(
        self,
        average: Callable[[], AveragingResult],
        delta: list[torch.Tensor],
        losses: list[float],
        training_seconds: float,
    ) -> None:
        assert self.round is None, "one round in flight at a time"
        self.round = Launched(self._executor.submit(average), delta, losses, training_seconds)

    def await_state(self, fetch: Callable[[], Optional[Download]], round_no: int) -> None:
        """Wait in the background for the state the swarm's round `round_no` ends on (`fetch`)."""
        assert self.round is None, "one round in flight at a time"
        self.round = Awaited(self._executor.submit(fetch), round_no)

    @property
    def launched(self) -> bool:
        """Whether a round of ours is in flight (the swarm's awaited round is not ours: it has no record)."""
        return isinstance(self.round, Launched)

    def done(self) -> bool:
        """Whether a round is in flight and has finished."""
        return self.round is not None and self.round.future.done()

    def wait(self) -> Optional[Union[Launched, Awaited]]:
        """The round in flight, once it is done (None if nothing was in flight); its outcome is `.future.result()`."""
        if self.round is None:
            return None
        entry, self.round = self.round, None
        entry.future.exception()  # waits until it is done (the outcome is read by the caller)
        return entry

    def drop(self) -> None:
        """Wait for the round in flight and forget it (we adopted another state)."""
        if self.round is not None:
            self.round.future.result()
            self.round = None

    def close(self) -> None:
        self._executor.shutdown(wait=True)
