"""Fault injection for tests and the churn soak, armed through the environment of a `tapestry join` process.

- TAPESTRY_CRASH_IN_ALLREDUCE=N: the node SIGKILLs itself during its N-th all-reduce, right after it has served one
  averaged part to a groupmate (so the groupmates see a reducer die mid-stream);
- TAPESTRY_RAISE_IN_ALLREDUCE=N (or `all`): the N-th (or every) all-reduce raises a RuntimeError inside tapestry's
  averager override once the averaging itself is done (groupmates are not held up), as a bug in our bookkeeping would:
  the round must be reported as failed, with the traceback in the log;
- TAPESTRY_SCALE_UPDATE=K: the node sends K times its real pseudo-gradient every round (and declares its norm), as a
  faulty partner with the run's own spec would (a bug, a wrong learning-rate schedule): its groupmates must clip it.

The averager hook runs in the averager process (see `comm.averager.FaultHook`); production nodes get None.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Optional

from tapestry_p2p.comm.averager import FaultHook

logger = logging.getLogger(__name__)

CRASH_ENV = "TAPESTRY_CRASH_IN_ALLREDUCE"
RAISE_ENV = "TAPESTRY_RAISE_IN_ALLREDUCE"
SCALE_ENV = "TAPESTRY_SCALE_UPDATE"
INJECTED = "injected fault"  # in the message of the RuntimeError raised for RAISE_ENV


def _armed(value: str, index: int) -> bool:
    return value == "all" or (value.isdigit() and int(value) == index)


def from_environment() -> Optional[FaultHook]:
    """The hook the environment asks for, or None."""
    crash, fail = os.environ.get(CRASH_ENV, ""), os.environ.get(RAISE_ENV, "")
    if not crash and not fail:
        return None

    def fault(event: str, allreduce_index: int) -> None:
        if event == "finished" and _armed(fail, allreduce_index):
            raise RuntimeError(f"{INJECTED} ({RAISE_ENV}={fail}) in all-reduce #{allreduce_index}")
        if event == "served" and _armed(crash, allreduce_index):
            logger.warning("%s is set: killing this node in the middle of an all-reduce", CRASH_ENV)
            os.kill(os.getppid(), signal.SIGKILL)  # the node; its other children die with it (PDEATHSIG)
            os.kill(os.getpid(), signal.SIGKILL)

    return fault


def update_scale_from_environment() -> float:
    """The factor TAPESTRY_SCALE_UPDATE asks for (1.0: none)."""
    value = os.environ.get(SCALE_ENV, "")
    return float(value) if value else 1.0
