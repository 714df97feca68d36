"""Process hygiene: every process a tapestry node starts dies with it, even when the node is killed with SIGKILL.

A node is a tree: the main process, hivemind's DHT process and averager process (forked), and the DHT's `p2pd`
(exec'd by the DHT process). hivemind does not tie their lifetimes together, so a SIGKILLed node leaves orphans that
keep ports and identities busy. Linux's PR_SET_PDEATHSIG does: each child asks the kernel to SIGKILL it when the
thread that created it exits. It must be set in the child itself (it is cleared on fork, kept across exec), so:

- `die_with_parent()` is called first thing in the DHT and averager processes;
- `spawn_children_that_die_with_us()` makes the DHT process start `p2pd` with the same flag (via `preexec_fn`),
  in a process group of its own, so that a Ctrl-C in the terminal (SIGINT to the whole foreground group) reaches
  only our main process, which then finishes the round it is in, instead of killing p2pd under the all-reduce.

`keep_tasks_alive()` fixes a hivemind hazard in the same child processes: their request loops start each request as
`asyncio.create_task(...)` and keep no reference to it, while asyncio itself keeps only weak ones, so the garbage
collector can destroy a request in flight ("Task was destroyed but it is pending!") and its caller waits forever.
We saw it hang a bootstrap node's start-up (`get_visible_maddrs` never answered) about once per full test run.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import signal
import sys
from typing import Callable, Set, TypeVar

_PR_SET_PDEATHSIG = 1

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


_running_tasks: Set[asyncio.Task] = set()


def keep_tasks_alive() -> None:
    """In this process, hold a strong reference to every task made by `asyncio.create_task` until it is done."""
    original = asyncio.create_task
    if getattr(original, "_tapestry_patched", False):
        return

    @functools.wraps(original)
    def create_task(coro, **kwargs):
        task = original(coro, **kwargs)
        _running_tasks.add(task)
        task.add_done_callback(_running_tasks.discard)
        return task

    create_task._tapestry_patched = True
    asyncio.create_task = create_task


def _detach_and_die_with_parent() -> None:
    os.setpgid(0, 0)
    die_with_parent()


def spawn_children_that_die_with_us() -> None:
    """In this process, make asyncio-spawned subprocesses (hivemind's p2pd) die when this process dies."""
    original = asyncio.subprocess.create_subprocess_exec
    if getattr(original, "_tapestry_patched", False):
        return

    @functools.wraps(original)
    async def create_subprocess_exec(*args, **kwargs):
        kwargs.setdefault("preexec_fn", _detach_and_die_with_parent)
        return await original(*args, **kwargs)

    create_subprocess_exec._tapestry_patched = True
    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec
