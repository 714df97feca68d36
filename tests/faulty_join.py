"""`tapestry join` with a fault injected by test subclasses (as hivemind's FaultyAverager does), for the tests and the
churn soak; production code has no switch for any of this. Run as

    python tests/faulty_join.py [--crash-in-allreduce N] [--raise-in-allreduce N|all] [--scale-update K] join ARGS...

- `--crash-in-allreduce N`: the node SIGKILLs itself during its N-th all-reduce, right after it served one averaged
  part to a groupmate (so the groupmates see a reducer die mid-stream);
- `--raise-in-allreduce N` (or `all`): the N-th (or every) all-reduce raises a RuntimeError inside tapestry's averager
  once the averaging itself is done (groupmates are not held up), as a bug in our bookkeeping would: the round must
  be reported as failed, with the traceback in the log;
- `--scale-update K`: the node sends K times its real pseudo-gradient every round (and declares its norm), as a
  faulty partner with the run's own spec would (a bug, a wrong learning-rate schedule): its groupmates must clip it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import torch

from tapestry_p2p.app.cli import main
from tapestry_p2p.comm.allreduce import ExactAllReduceRunner
from tapestry_p2p.comm.averager import AllReduceOutcome, ExactAverager
from tapestry_p2p.comm.averaging import RoundMeta, SwarmAveraging
from tapestry_p2p.comm.matchmaking import Pace
from tapestry_p2p.node.node import Node
from tapestry_p2p.node.session import SwarmSession

logger = logging.getLogger("tapestry_p2p.faulty")

INJECTED = "injected fault"  # in the message of the RuntimeError --raise-in-allreduce raises
KILLED = "killing this node in the middle of an all-reduce"


class KillAfterServing(ExactAllReduceRunner):
    """A reducer that dies right after it served its first averaged part to a groupmate."""

    async def rpc_aggregate_part(self, stream: Any, context: Any) -> Any:
        async for message in super().rpc_aggregate_part(stream, context):
            yield message
            logger.warning("--crash-in-allreduce: %s", KILLED)
            os.kill(os.getppid(), signal.SIGKILL)  # the node; its other children die with it (PDEATHSIG)
            os.kill(os.getpid(), signal.SIGKILL)


def armed(value: str, index: int) -> bool:
    return value == "all" or (value.isdigit() and int(value) == index)


def faulty_node(crash: str, fail: str, scale: float) -> type[Node]:
    class FaultyAverager(ExactAverager):
        @property
        def runner_class(self) -> type[ExactAllReduceRunner]:  # type: ignore[override]
            return KillAfterServing if armed(crash, self._allreduces) else ExactAllReduceRunner

        async def _reduce(
            self, runner: Any, tensors: Sequence[torch.Tensor], outcome: AllReduceOutcome, pace: Pace
        ) -> None:
            await super()._reduce(runner, tensors, outcome, pace)
            if armed(fail, self._allreduces):
                raise RuntimeError(f"{INJECTED} (--raise-in-allreduce {fail}) in all-reduce #{self._allreduces}")

    class FaultyAveraging(SwarmAveraging):
        averager_class = FaultyAverager

    class FaultySession(SwarmSession):
        averaging_class = FaultyAveraging

    class FaultyNode(Node):
        session_class = FaultySession

        def _contribution(self) -> tuple[list[torch.Tensor], RoundMeta]:
            delta, meta = super()._contribution()
            return [d * scale for d in delta] if scale != 1.0 else delta, meta

    return FaultyNode


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crash-in-allreduce", default="")
    parser.add_argument("--raise-in-allreduce", default="")
    parser.add_argument("--scale-update", type=float, default=1.0)
    faults, rest = parser.parse_known_args()
    node_class = faulty_node(faults.crash_in_allreduce, faults.raise_in_allreduce, faults.scale_update)
    sys.exit(main(rest, node_class=node_class))
