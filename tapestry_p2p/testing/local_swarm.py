"""A swarm of real `tapestry` processes on this machine, for the demo, the tests and the scripts.

`LocalSwarm` starts `python -m tapestry_p2p ...` processes (each in a session of its own, so a Ctrl-C in the terminal
reaches only whoever started them), logs each to `<workdir>/<name>.log`, and stops them by pid: SIGTERM, then SIGKILL
after a grace period, then every process that was ever seen under one of them (hivemind's DHT and averager processes,
p2pd). It never touches a process it did not start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Optional

import psutil

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
# A model small enough for 2 CPU cores and many processes at once (about 0.1M parameters).
TINY_MODEL = ["--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--block-size", "32", "--batch-size", "8"]
POLL_SECONDS = 0.2
LOG_TAIL_CHARS = 3000


class LocalSwarmError(RuntimeError):
    """A process did not start (or exited early); the first line says which, the rest is the end of its log."""


def last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "(no output)"


def wait_for_file(
    path: Path, timeout: float, popen: Optional[subprocess.Popen] = None, log: Optional[Path] = None
) -> str:
    """The non-empty content of `path` once it appears; raises LocalSwarmError if `popen` exits first or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        if popen is not None and popen.poll() is not None:
            raise LocalSwarmError(f"process exited with {popen.returncode} before writing {path}{_tail(log)}")
        time.sleep(POLL_SECONDS)
    raise LocalSwarmError(f"{path} did not appear within {timeout}s{_tail(log)}")


def _tail(log: Optional[Path]) -> str:
    if log is None or not log.exists():
        return ""
    return f": {last_line(log)}\n(log ends:)\n{log.read_text(errors='replace')[-LOG_TAIL_CHARS:]}"


def wait_gone(processes: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait for processes to exit; return those still alive (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    alive = list(processes)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(POLL_SECONDS)
    return alive


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LocalSwarm:
    """Starts tapestry processes and stops every one of them, with all they spawned; a context manager."""

    def __init__(self, workdir: Path, stop_grace: float = 20.0) -> None:
        self.workdir, self.stop_grace = workdir, stop_grace
        self.started: list[subprocess.Popen] = []
        self.descendants: dict[int, psutil.Process] = {}

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(
        self, kind: Optional[type[BaseException]], error: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.stop_all()

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def start(
        self,
        name: str,
        *args: str,
        env: Optional[dict[str, str]] = None,
        prefix: Sequence[str] = (),
        program: Sequence[str] = ("-m", "tapestry_p2p"),
    ) -> subprocess.Popen:
        """`[prefix...] python -m tapestry_p2p ARGS` (or another `program` of this Python), its output in
        `<workdir>/<name>.log`."""
        with open(self.log_path(name), "wb") as log:
            popen = subprocess.Popen(
                [*prefix, sys.executable, *program, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                start_new_session=True,
            )
        self.started.append(popen)
        return popen

    def start_bootstrap(
        self,
        name: str = "bootstrap",
        run_id: Optional[str] = None,
        timeout: float = 90,
        partner: Optional[str] = None,
        extra: Sequence[str] = (),
    ) -> str:
        """A real `tapestry bootstrap` on loopback (identity `<workdir>/<name>.key`, `extra` flags last); returns its
        full multiaddr once it is up."""
        addr_file = self.workdir / f"{name}.addr"
        args = ["bootstrap", "--listen", LOOPBACK, "--identity", str(self.workdir / f"{name}.key")]
        args += ["--addr-file", str(addr_file)] + (["--run-id", run_id] if run_id else [])
        args += (["--partner", partner] if partner else []) + list(extra)
        popen = self.start(name, *args)
        return wait_for_file(addr_file, timeout, popen, self.log_path(name)).split()[0]

    def remember_children(self, popen: subprocess.Popen) -> list[psutil.Process]:
        """The processes under `popen` now; they are killed at `stop_all` if still alive."""
        try:
            children = psutil.Process(popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in children:
            self.descendants.setdefault(child.pid, child)
        return children

    def stop_all(self) -> list[subprocess.Popen]:
        """SIGTERM every process we started (by pid), SIGKILL what is left after the grace period, then kill anything
        left of their process trees. Returns the processes that had to be SIGKILLed."""
        for popen in self.started:
            if popen.poll() is None:
                self.remember_children(popen)
                popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        killed = []
        for popen in self.started:
            try:
                popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
                killed.append(popen)
        for child in self.descendants.values():
            if _alive(child):
                child.kill()
        return killed

    def leftovers(self) -> list[psutil.Process]:
        """Processes ever seen under one of ours that are still alive."""
        return [child for child in self.descendants.values() if _alive(child)]
