"""Process hygiene: every process a tapestry node starts dies with it, even when the node is killed with SIGKILL.

A node is a tree: the main process, hivemind's DHT process and averager process (forked), and the DHT's `p2pd`
(exec'd by the DHT process). hivemind does not tie their lifetimes together, so a SIGKILLed node leaves orphans that
keep ports and identities busy. Linux's PR_SET_PDEATHSIG does: each child asks the kernel to SIGKILL it when the
thread that created it exits. It must be set in the child itself (it is cleared on fork, kept across exec), so:

- `die_with_parent()` is called first thing in the DHT and averager processes;
- `spawn_children_that_die_with_us()` makes the DHT process start `p2pd` with the same flag (via `preexec_fn`).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent thread exits (no-op outside Linux)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:  # the parent died before we got here
        os.kill(os.getpid(), sig)


def spawn_children_that_die_with_us() -> None:
    """In this process, make asyncio-spawned subprocesses (hivemind's p2pd) die when this process dies."""
    original = asyncio.subprocess.create_subprocess_exec
    if getattr(original, "_tapestry_patched", False):
        return

    @functools.wraps(original)
    async def create_subprocess_exec(*args, **kwargs):
        kwargs.setdefault("preexec_fn", die_with_parent)
        return await original(*args, **kwargs)

    create_subprocess_exec._tapestry_patched = True
    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec
