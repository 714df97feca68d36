"""A partner bigger than one process (real processes on loopback): `torchrun --nproc-per-node 2` runs one partner as
two ranks (gloo, CPU), beside a one-process partner. Only rank 0 joins the swarm; every outer round's result reaches
rank 1; all three processes end with the same shared model."""

from __future__ import annotations

import re
import sys

import pytest
from helpers import join_args, metrics, run_to_completion

from tapestry_p2p.testing.local_swarm import LocalSwarm

pytestmark = pytest.mark.e2e
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python"]
LOOPBACK_ONLY = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


def test_a_two_rank_partner_averages_with_a_one_process_partner(tmp_path):
    with LocalSwarm(tmp_path) as swarm:
        boot = swarm.start_bootstrap()
        procs = {
            "big": swarm.start(
                "big",
                *join_args(tmp_path, "big", 1, boot, 3, "--min-peers", "2", "--batch-size", "8"),
                env=LOOPBACK_ONLY,
                prefix=TORCHRUN,
            ),
            "small": swarm.start(
                "small", *join_args(tmp_path, "small", 2, boot, 3, "--min-peers", "2", "--batch-size", "8")
            ),
        }
        run_to_completion(swarm, procs, timeout=240)
        big_log = swarm.log("big")
    big, small = metrics(tmp_path, "big"), metrics(tmp_path, "small")
    assert len(big) == 3, big_log[-3000:]  # one partner: only rank 0 writes records
    assert any(r["group_size"] == 2 for r in small)
    assert all(r["group_size"] <= 2 for r in small)  # rank 1 never appears in the swarm
    final = big[-1]["model_hash"]
    assert next(r["model_hash"] for r in small if r["round"] == big[-1]["round"]) == final
    ranks = re.findall(r"rank (\d) of 2 ends with shared model ([0-9a-f]{16})", big_log)
    assert ranks == [("1", final)], big_log[-3000:]
