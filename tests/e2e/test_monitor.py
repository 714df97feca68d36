"""`tapestry monitor` against a real swarm: three trainers and a bootstrap node, then one trainer killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from helpers import join_args

from tapestry_p2p.node.metrics import read_jsonl
from tapestry_p2p.telemetry.status import EXPIRY
from tapestry_p2p.testing.local_swarm import wait_for_file

RUN = "watched"


def monitor_json(bootstrap: str) -> list:
    result = subprocess.run(
        [sys.executable, "-m", "tapestry_p2p", "monitor", "--initial-peers", bootstrap, "--run-id", RUN, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def rounds_done_by(path, when: float) -> int:
    """The round a peer's metrics file had reached at unix time `when` (when its status record was published)."""
    return max((r["round"] for r in read_jsonl(path) if r["time"] <= when), default=0)


def test_monitor_lists_exactly_the_running_peers_and_drops_a_dead_one(procs, tmp_path):
    bootstrap = procs.start_bootstrap("boot", run_id=RUN, partner="the-bootstrap")
    trainers = {
        name: procs.start(
            name, *join_args(tmp_path, name, i, bootstrap, 100, "--run-id", RUN, "--quiet", "--min-peers", "3")
        )
        for i, name in enumerate(["anna", "bert", "cleo"])
    }
    for name in trainers:  # everyone has finished a round
        wait_for_file(tmp_path / name / "metrics.jsonl", 120, trainers[name])

    peers = monitor_json(bootstrap)
    by_partner = {p["partner"]: p for p in peers}
    assert sorted(by_partner) == ["anna", "bert", "cleo", "the-bootstrap"], peers
    assert by_partner["the-bootstrap"]["role"] == "bootstrap"
    for name in trainers:
        record = by_partner[name]
        assert record["role"] == "trainer" and record["state"] in ("training", "averaging", "loading state")
        assert abs(record["round"] - rounds_done_by(tmp_path / name / "metrics.jsonl", record["time"])) <= 1
        assert record["group_size"] == 3 and record["compression"] == "8bit"
        assert record["bytes_sent_total"] > 0 and record["tokens_per_second"] > 0
        assert record["peer_id"] in (tmp_path / name / "metrics.jsonl").read_text()

    os.kill(trainers["bert"].pid, signal.SIGKILL)
    killed = time.monotonic()
    while True:
        listed = {p["partner"] for p in monitor_json(bootstrap)}
        if "bert" not in listed:
            break
        assert time.monotonic() - killed < EXPIRY + 15, "a dead peer is still listed after its record expired"
    assert listed == {"anna", "cleo", "the-bootstrap"}
