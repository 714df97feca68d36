"""--overlap with real processes: each round's all-reduce runs while the next round trains, and the swarm keeps one
model through a partner killed in the middle of an all-reduce and resumed from its checkpoint.

One swarm: a bootstrap and three partners with --overlap. c SIGKILLs itself during its second all-reduce (fault
injection), while it is already training the next round; it is restarted from its checkpoint, gets a's and b's
model, and averages with them again.
"""

from __future__ import annotations

import math
import re
import signal

from faulty_join import KILLED
from helpers import faulty, join_args, metrics, run_to_completion

ROUNDS = 25  # rounds of a and b: long enough (rounds take ~2 s) for c to die, restart, catch up and average again


def test_overlapped_rounds_keep_one_model_through_a_crash_and_a_resume(procs, tmp_path):
    boot = procs.start_bootstrap("boot")
    args = {
        name: join_args(tmp_path, name, i, boot, ROUNDS, "--min-peers", "3", "--overlap")
        for i, name in enumerate("abc")
    }
    popens = {name: procs.start(name, *args[name]) for name in "ab"}
    popens["c"] = procs.start("c", *args["c"], program=faulty("--crash-in-allreduce", "2"))
    assert popens["c"].wait(timeout=150) == -signal.SIGKILL, procs.log("c")[-2000:]
    assert KILLED in procs.log("c")
    before_crash = metrics(tmp_path, "c")

    popens["c again"] = procs.start("c again", *args["c"], "--max-rounds", "6")
    run_to_completion(procs, {"a": popens["a"], "b": popens["b"], "c again": popens["c again"]}, timeout=300)

    a, b, c = (metrics(tmp_path, name) for name in ("a", "b", "c"))
    # (a partner that re-syncs after the crash round adopts a later round: its round numbers may skip ahead)
    assert all(x["round"] < y["round"] for x, y in zip(a, a[1:], strict=False))
    a_by_round, b_by_round = {r["round"]: r for r in a}, {r["round"]: r for r in b}
    common = sorted(a_by_round.keys() & b_by_round.keys())
    assert a_by_round[common[-1]]["model_hash"] == b_by_round[common[-1]]["model_hash"]  # one model, last common round
    averaged = [a_by_round[n] for n in common if a_by_round[n]["group_size"] > 1 and a_by_round[n]["failure"] is None]
    assert len(averaged) >= ROUNDS // 2
    for record in averaged:  # every clean round leaves a and b with the same model, bit for bit
        assert record["model_hash"] == b_by_round[record["round"]]["model_hash"]
        # the all-reduce ran in the background, while the next round trained: the loop did not wait through it
        assert "background_wait" in record["seconds"] and record["allreduce_seconds"] > 0
        # (a partner whose next meeting was already near when it launched trains no step before it: no loss)
        assert record["loss"] is None if record["inner_steps"] == 0 else math.isfinite(record["loss"])

    # c came back from its checkpoint, got the swarm's model (caught up before a round, or re-synced from its group
    # after one, depending on where a and b were when it came back), and averaged with them again on their model
    log = procs.log("c again")
    assert "resumed from" in log
    # (or, resumed on the very state the swarm averaged its round in flight from, it took that round's outcome)
    ways_back = ("caught up with the swarm", "re-synced from it", "took the swarm's round")
    assert any(way in log for way in ways_back), log[-3000:]
    resumed = c[len(before_crash) :]
    assert resumed and resumed[0]["round"] > (before_crash[-1]["round"] if before_crash else 0)
    together = [r for r in resumed if r["group_size"] > 1 and r["failure"] is None and not r["resynced"]]
    assert len(together) >= len(resumed) // 2 and any(r["group_size"] == 3 for r in together), resumed
    for record in together:
        theirs = {x["model_hash"] for x in (a_by_round.get(record["round"]), b_by_round.get(record["round"])) if x}
        assert record["model_hash"] in theirs
    # when it took the outcome of a round a and b had in flight, it met them at their next round (unless that one was
    # in flight too by then, and taken the same way)
    taken = [int(n) for n in re.findall(r"took the swarm's round (\d+)", log)]
    for n in (n for n in taken if n + 1 not in taken):
        assert any(r["round"] == n + 1 and r["group_size"] > 1 for r in resumed), (n, resumed)
