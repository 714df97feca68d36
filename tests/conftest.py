"""Shared fixtures: real processes on loopback, and making sure every process a test starts is gone afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil
import pytest

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class Processes:
    """Starts `python -m tapestry_p2p ...` processes and stops them, by pid, with everything they spawned."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: List[subprocess.Popen] = []
        self.descendants: List[psutil.Process] = []

    def start(self, name: str, *args: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        popen = subprocess.Popen(
            [sys.executable, "-m", "tapestry_p2p", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.close()
        self.started.append(popen)
        return popen

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def remember_children(self, popen: subprocess.Popen) -> List[psutil.Process]:
        children = psutil.Process(popen.pid).children(recursive=True)
        self.descendants.extend(children)
        return children

    def stop_all(self) -> None:
        for popen in self.started:
            if popen.poll() is None:
                try:
                    self.descendants.extend(psutil.Process(popen.pid).children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
                popen.send_signal(signal.SIGTERM)
        for popen in self.started:
            try:
                popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        for child in self.descendants:  # anything left of a process tree we started
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def procs(tmp_path):
    processes = Processes(tmp_path)
    yield processes
    processes.stop_all()


def wait_for_file(path: Path, timeout: float, popen: subprocess.Popen | None = None, log: Path | None = None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        if popen is not None and popen.poll() is not None:
            raise AssertionError(f"process exited with {popen.returncode} before writing {path}{_tail(log)}")
        time.sleep(0.2)
    raise AssertionError(f"{path} did not appear within {timeout}s{_tail(log)}")


def _tail(log: Path | None) -> str:
    return f"; its log ends:\n{log.read_text(errors='replace')[-3000:]}" if log is not None and log.exists() else ""


def wait_gone(processes: List[psutil.Process], timeout: float) -> List[psutil.Process]:
    """Wait for processes to exit; return those still alive (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    alive = list(processes)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    return alive


def start_bootstrap(procs: Processes, tmp_path: Path, name: str = "bootstrap") -> str:
    """Start a real `tapestry bootstrap` on loopback; returns its full multiaddr once it is up."""
    addr_file = tmp_path / f"{name}.addr"
    popen = procs.start(
        name,
        "bootstrap",
        "--listen",
        LOOPBACK,
        "--identity",
        str(tmp_path / f"{name}.key"),
        "--addr-file",
        str(addr_file),
    )
    return wait_for_file(addr_file, 90, popen, tmp_path / f"{name}.log").split()[0]


@pytest.fixture
def bootstrap_addr(procs, tmp_path):
    """A real `tapestry bootstrap` on loopback; yields its full multiaddr."""
    return start_bootstrap(procs, tmp_path)


def write_text(path: Path, seed: int, n_bytes: int = 6000) -> Path:
    """Deterministic pseudo-text (words from a small vocabulary) for a partner's data folder."""
    import random

    rng = random.Random(seed)
    words = "river bread city map language model partner data mountain garden train harbour book".split()
    text = []
    while sum(len(w) + 1 for w in text) < n_bytes:
        text.append(rng.choice(words))
    path.write_text(" ".join(text))
    return path
