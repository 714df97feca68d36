"""The real world, with real processes on loopback: bootstrap nodes going away, a peer killed in the middle of an
all-reduce, and a partner arriving half-way through the run.

One swarm plays the whole story, in order, because each act needs the state the previous one left:
1. three partners start from two bootstrap nodes; after round 2 both bootstrap nodes are SIGKILLed;
2. in round 3, partner c SIGKILLs itself right after serving one averaged part to a groupmate (fault injection through
   TAPESTRY_CRASH_IN_ALLREDUCE): the survivors record the failure within a bounded time, go on, and average together
   again with one model (usually in round 4);
3. partner d joins through partner a's address (no bootstrap is left): it downloads the shared state from both
   survivors, its model then equals theirs, and it averages with them from its first round.
"""

from __future__ import annotations

import math
import re
import signal
import time

import pytest
from faulty_join import KILLED
from helpers import faulty, join_args, metrics

from tapestry_p2p.comm.averaging import ALLREDUCE_TIMEOUT
from tapestry_p2p.testing.local_swarm import wait_gone

CRASH_ROUND = 3


def wait_for_round(tmp_path, name: str, round_no: int, procs, timeout: float = 120) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = tmp_path / name / "metrics.jsonl"
        records = metrics(tmp_path, name) if path.exists() else []
        if records and records[-1]["round"] >= round_no:
            return records
        time.sleep(0.5)
    pytest.fail(f"{name} did not reach round {round_no}: {procs.log(name)[-3000:]}")


def by_round(records: list) -> dict:
    return {r["round"]: r for r in records}


def test_swarm_survives_bootstrap_loss_a_crash_mid_allreduce_and_a_late_joiner(procs, tmp_path):
    bootstraps = [procs.start_bootstrap(name) for name in ("boot1", "boot2")]
    boot_popens = procs.started[:2]
    popens = {}
    for i, name in enumerate(["a", "b", "c"]):
        args = join_args(tmp_path, name, i, None, 100, "--min-peers", "3", "--initial-peers", *bootstraps)
        program = faulty("--crash-in-allreduce", str(CRASH_ROUND)) if name == "c" else ("-m", "tapestry_p2p")
        popens[name] = procs.start(name, *args, program=program)

    # 1. every bootstrap node goes down after round 2
    for name in ("a", "b"):
        wait_for_round(tmp_path, name, 2, procs)
    boot_children = [child for popen in boot_popens for child in procs.remember_children(popen)]
    for popen in boot_popens:
        popen.send_signal(signal.SIGKILL)
        popen.wait(timeout=10)
    assert wait_gone(boot_children, 10) == [], "a bootstrap node's process outlived it"
    c_children = procs.remember_children(popens["c"])

    # 2. c dies in the middle of round 3's all-reduce; nothing of it survives; a and b go on, and average together
    popens["c"].wait(timeout=120)
    assert popens["c"].returncode == -signal.SIGKILL
    assert KILLED in procs.log("c")
    assert wait_gone(c_children, 10) == [], "a process of the killed peer outlived it"
    survivors = {name: by_round(wait_for_round(tmp_path, name, CRASH_ROUND, procs)) for name in ("a", "b")}
    crash_round = [survivors[name][CRASH_ROUND] for name in ("a", "b")]
    assert any(r["failure"] for r in crash_round), crash_round  # the metrics say what went wrong
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in crash_round)
    assert all(r["round_seconds"] < ALLREDUCE_TIMEOUT + 30 for r in crash_round)  # nobody hangs
    # the survivors average together again, with one model, within a few rounds (usually the very next one)
    together = None
    for round_no in range(CRASH_ROUND + 1, CRASH_ROUND + 15):
        records = [by_round(wait_for_round(tmp_path, name, round_no, procs)).get(round_no) for name in ("a", "b")]
        if None not in records and [r["group_size"] for r in records] == [2, 2]:  # without any bootstrap node
            together = records
            break
    assert together is not None, survivors
    assert together[0]["model_hash"] == together[1]["model_hash"], together

    # 3. a late joiner, through a peer's address: it downloads the state from both survivors and then equals them
    a_addr = re.search(r"listening on (\S+)", procs.log("a")).group(1)
    joiner_args = join_args(tmp_path, "d", 7, None, 2, "--initial-peers", a_addr)
    joiner = procs.start("d", *joiner_args)
    joiner.wait(timeout=150)
    assert joiner.returncode == 0, procs.log("d")[-3000:]
    caught_up = re.search(
        r"caught up with the swarm at round (\d+) \(model (\w+)\), downloaded [\d.]+ MB from (\d+) peers",
        procs.log("d"),
    )
    assert caught_up, procs.log("d")[-3000:]
    round_no, model_hash, servers = int(caught_up.group(1)), caught_up.group(2), int(caught_up.group(3))
    assert servers == 2  # not all from the same peer
    a_rounds = by_round(wait_for_round(tmp_path, "a", round_no + 2, procs))
    assert a_rounds[round_no]["model_hash"] == model_hash  # the joiner's shared model is the swarm's
    d_records = metrics(tmp_path, "d")
    first = d_records[0]["round"]  # round_no + 1, or later if the swarm finished a round during our download
    assert first > round_no and [r["round"] for r in d_records] == [first, first + 1]
    for record in d_records:  # in step with the swarm
        assert record["group_size"] == 3
        assert record["model_hash"] == a_rounds[record["round"]]["model_hash"]

    for name in ("a", "b"):  # SIGTERM: finish or abandon the round, checkpoint, exit 0
        popens[name].send_signal(signal.SIGTERM)
    for name in ("a", "b"):
        popens[name].wait(timeout=60)
        assert popens[name].returncode == 0, procs.log(name)[-2000:]
