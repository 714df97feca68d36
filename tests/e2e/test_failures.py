"""A bug in our own all-reduce code must not hide as "no group": with real processes, a partner whose averager
override raises (fault injection through TAPESTRY_RAISE_IN_ALLREDUCE) reports every round as failed, with the
traceback in its log, and the peer table shows the failure."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from faulty_join import INJECTED
from helpers import faulty, join_args, metrics


def wait_for_records(tmp_path, name: str, procs, timeout: float = 150) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = metrics(tmp_path, name)
        if records:
            return records
        time.sleep(0.5)
    pytest.fail(f"{name} finished no round: {procs.log(name)[-3000:]}")


def peer_table(bootstrap_addr: str) -> str:
    monitor = subprocess.run(
        [
            sys.executable,
            "-m",
            "tapestry_p2p",
            "monitor",
            "--initial-peers",
            bootstrap_addr,
            "--run-id",
            "e2e",
            "--once",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert monitor.returncode == 0, monitor.stderr[-2000:]
    return monitor.stdout


def test_an_exception_in_our_allreduce_override_is_a_failed_round_with_its_traceback(procs, bootstrap_addr, tmp_path):
    popens = {
        name: procs.start(
            name,
            *join_args(tmp_path, name, i, bootstrap_addr, 100, "--min-peers", "2"),
            program=faulty("--raise-in-allreduce", "all") if name == "buggy" else ("-m", "tapestry_p2p"),
        )
        for i, name in enumerate(["healthy", "buggy"])
    }
    record = wait_for_records(tmp_path, "buggy", procs)[-1]
    expected = f"internal error in the all-reduce: RuntimeError: {INJECTED}"
    assert record["failure"].startswith(expected), record
    assert record["group_size"] == 1 and record["left_out"] == record["failure"]  # (it follows the group's outcome)
    log = procs.log("buggy")
    assert "failed inside tapestry's code (a bug, not the network)" in log
    assert "Traceback (most recent call last)" in log and f"RuntimeError: {INJECTED}" in log
    assert "round without a group" not in log and "no other peer came to the meeting" not in log

    # the peer table shows it (under the table, one line per peer whose last round failed, folded at 80 columns)
    deadline, shown = time.monotonic() + 90, ""
    while not re.search(rf"buggy round \d+ failed: {re.escape(expected)}", shown):
        assert time.monotonic() < deadline, shown  # (a round in which nobody else came would say so instead)
        shown = " ".join(peer_table(bootstrap_addr).split())

    for popen in popens.values():  # the buggy partner still stops cleanly
        popen.send_signal(signal.SIGTERM)
    for name, popen in popens.items():
        assert popen.wait(timeout=60) == 0, procs.log(name)[-2000:]
