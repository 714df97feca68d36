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

Applying the average as soon as it is there keeps the state a peer serves current for most of the round: the
meeting number is theta's round + 1, + 1 while a round is in flight, so a joiner that downloads a settled state
meets with the swarm at once; one that downloaded while the round was in flight meets alone once, and the next
catch-up or re-sync puts it in step (tests/e2e/test_overlap.py).

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
from typing import Optional

import torch

from tapestry_p2p.comm.averaging import AveragingResult


@dataclass
class Launched:
    """The round whose all-reduce is in flight."""

    future: concurrent.futures.Future[AveragingResult]
    delta: list[torch.Tensor]  # what we contributed (kept: the working model's progress is measured past it)
    losses: list[float]  # its inner steps' losses
    training_seconds: float


class InFlight:
    """At most one round in flight: launch it in a background thread, wait for it, or drop it."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tapestry-round")
        self.round: Optional[Launched] = None

    def launch(
        self,
        average: Callable[[], AveragingResult],
        delta: list[torch.Tensor],
        losses: list[float],
        training_seconds: float,
    ) -> None:
        assert self.round is None, "one round in flight at a time"
        self.round = Launched(self._executor.submit(average), delta, losses, training_seconds)

    def done(self) -> bool:
        """Whether a round is in flight and its all-reduce has finished."""
        return self.round is not None and self.round.future.done()

    def wait(self) -> Optional[tuple[Launched, AveragingResult]]:
        """The round in flight and its result, once it is done (None if nothing was in flight)."""
        if self.round is None:
            return None
        launched, self.round = self.round, None
        return launched, launched.future.result()

    def drop(self) -> None:
        """Wait for the round in flight and forget it (we adopted another state)."""
        if self.round is not None:
            self.round.future.result()
            self.round = None

    def close(self) -> None:
        self._executor.shutdown(wait=True)
