"""Process hygiene: every process a tapestry node starts dies with it, even when the node is killed with SIGKILL.

A node is a tree: the main process, hivemind's DHT process and averager process (forked), and the DHT's `p2pd`
(exec'd by the DHT process). hivemind does not tie their lifetimes together, so a SIGKILLed node leaves orphans that
keep ports and identities busy. Linux's PR_SET_PDEATHSIG does: each child asks the kernel to SIGKILL it when the
thread that created it exits. It must be set in the child itself (it is cleared on fork, kept across exec), so:

- `die_with_parent()` is called first thing in the DHT and averager processes (by `hivemind_compat.install`);
- the DHT process starts `p2pd` with the same flag, in a process group of its own
  (`hivemind_compat.spawn_children_that_die_with_us`), so that a Ctrl-C in the terminal (SIGINT to the whole
  foreground group) reaches only our main process, which then finishes the round it is in.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

_PR_SET_PDEATHSIG = 1
TRAINING_NICENESS = 10  # how much lower the training thread runs than the node's network processes and threads

T = TypeVar("T")


def keeping_sigint_handler(start: Callable[[], T]) -> T:
    """Run `start()` and restore our SIGINT handler afterwards: hivemind sets SIGINT to SIG_IGN when it starts a
    background process, which would make the node deaf to Ctrl-C."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        return start()
    finally:
        signal.signal(signal.SIGINT, handler)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent thread exits (no-op outside Linux)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:  # the parent died before we got here
        os.kill(os.getpid(), sig)


def train_below_the_network(niceness: int = TRAINING_NICENESS) -> None:
    """Lower the priority of the calling thread (the training loop; on Linux, niceness is per thread, and threads it
    starts later inherit it). The DHT and averager processes, started before, keep theirs: on cores that training
    keeps busy, a round's declarations, votes and parts must not queue behind inner steps (16 partners on 2 cores
    declared every round late otherwise). On idle cores it changes nothing."""
    if sys.platform.startswith("linux"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
