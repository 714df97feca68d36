"""Overlapped rounds with real processes: each round's all-reduce runs while the next round trains, and the swarm keeps
one model through a partner killed in the middle of an all-reduce and resumed from its checkpoint.

One swarm: a bootstrap and three partners (overlapped rounds are the default). c SIGKILLs itself during its second
all-reduce (tests/faulty_join.py), while it is already training the next round; it is restarted from its checkpoint,
takes a's and b's model, and averages with them again. Every assertion reads the round records: who was in each
round's group, with which model.
"""

from __future__ import annotations

import math
import signal
from collections import defaultdict

from faulty_join import KILLED
from helpers import faulty, join_args, metrics, run_to_completion

ROUNDS = 16  # rounds of a and b: long enough (rounds take ~3 s) for c to die, restart, catch up and average 6 rounds
RESUMED_ROUNDS = 6


def slots(records: dict[str, list[dict]]) -> dict[tuple, dict[str, dict]]:
    """(round, meeting) -> partner -> its record of that agreement."""
    by_slot: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for name, rows in records.items():
        for row in rows:
            by_slot[(row["round"], row["meeting"])][name] = row
    return by_slot


def test_overlapped_rounds_keep_one_model_through_a_crash_and_a_resume(procs, tmp_path):
    boot = procs.start_bootstrap("boot")
    args = {name: join_args(tmp_path, name, i, boot, ROUNDS, "--min-peers", "3") for i, name in enumerate("abc")}
    popens = {name: procs.start(name, *args[name]) for name in "ab"}
    popens["c"] = procs.start("c", *args["c"], program=faulty("--crash-in-allreduce", "2"))
    assert popens["c"].wait(timeout=150) == -signal.SIGKILL, procs.log("c")[-2000:]
    assert KILLED in procs.log("c")
    before_crash = metrics(tmp_path, "c")

    popens["c again"] = procs.start("c again", *args["c"], "--max-rounds", str(RESUMED_ROUNDS))
    run_to_completion(procs, {"a": popens["a"], "b": popens["b"], "c again": popens["c again"]}, timeout=300)

    records = {name: metrics(tmp_path, name) for name in "abc"}
    name_of = {r["peer_id"]: name for name, rows in records.items() for r in rows}  # (c has a new id after its restart)
    peer = {name: records[name][-1]["peer_id"] for name in "abc"}
    c_before = before_crash[0]["peer_id"] if before_crash else None
    # every agreement: the members that recorded it recorded the same group, and hold one model after it
    for slot, rows in slots(records).items():
        for row in rows.values():
            for member in row["members"]:
                theirs = rows.get(name_of[member])
                if theirs is None:  # only c, killed in that round's all-reduce, has no record of it
                    assert member == c_before and row["lost_reducers"] == [member], (slot, rows)
                    continue
                assert (theirs["group_id"], theirs["members"]) == (row["group_id"], row["members"]), (slot, rows)
                assert theirs["model_hash"] == row["model_hash"], (slot, rows)
                if len(row["members"]) > 1 and not (row["unreported"] or theirs["unreported"]):
                    # the group agreed on its next meeting inside the round: the same time, after this one
                    assert theirs["next_meeting"] == row["next_meeting"] > row["meeting"], (slot, rows)

    # a and b averaged together in every round, from their first to their last (the crash cost c's span only)
    for name in "ab":
        assert [r["round"] for r in records[name]] == list(range(1, ROUNDS + 1))
        for record in records[name]:
            assert {peer["a"], peer["b"]} <= set(record["members"]) and record["left_out"] is None, record
            # the all-reduce ran in the background, while the next round trained
            assert "background_wait" in record["seconds"] and record["allreduce_seconds"] > 0
            # (a partner whose next meeting was already near when it launched trains no step before it: no loss)
            assert record["loss"] is None if record["inner_steps"] == 0 else math.isfinite(record["loss"])
    crash_round = len(before_crash) + 1  # the round of c's second all-reduce
    crashed = [r for r in records["a"] if r["round"] == crash_round][0]
    assert c_before in crashed["members"] and crashed["failure"] and crashed["lost_reducers"] == [c_before]

    # c came back from its checkpoint, took the swarm's model and averaged with a and b within two rounds, then in
    # every round after
    resumed = records["c"][len(before_crash) :]
    assert "resumed from" in procs.log("c again") and len(resumed) == RESUMED_ROUNDS
    assert resumed[0]["round"] > crash_round
    together = [i for i, r in enumerate(resumed) if set(r["members"]) == set(peer.values())]
    assert together and together[0] <= 1, resumed
    assert together == list(range(together[0], RESUMED_ROUNDS)), resumed
