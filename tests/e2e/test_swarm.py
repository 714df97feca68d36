"""End to end with real processes: `tapestry bootstrap` and `tapestry join` talking over loopback."""

from __future__ import annotations

import math
import os
import signal
import stat
import time

import psutil
import torch
from helpers import ROUND_WINDOW, ROUNDS, join_args, metrics, run_to_completion
from safetensors.torch import load_file

from tapestry_p2p.security.identity import load_or_create_identity
from tapestry_p2p.testing.local_swarm import LOOPBACK, wait_for_file, wait_gone
from tapestry_p2p.training.model import GPT, ModelConfig


def test_peers_share_one_identical_model_every_round(procs, bootstrap_addr, tmp_path):
    n_peers = 3  # 2 peers end to end: tests/e2e/test_churn.py (after the crash)
    names = [f"p{i}" for i in range(n_peers)]
    popens = {
        n: procs.start(n, *join_args(tmp_path, n, i, bootstrap_addr, ROUNDS, "--min-peers", str(n_peers)))
        for i, n in enumerate(names)
    }
    run_to_completion(procs, popens)

    records = {n: metrics(tmp_path, n) for n in names}
    for n in names:
        assert [r["round"] for r in records[n]] == list(range(1, ROUNDS + 1))
        assert all(r["group_size"] == n_peers for r in records[n]), [
            (r["round"], r["group_size"], r["failure"], r["refused"]) for r in records[n]
        ]
        assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in records[n])
        losses = [r["loss"] for r in records[n] if r["loss"] is not None]  # None: joined a meeting with no steps
        assert losses[-1] < losses[0]
    for round_index in range(ROUNDS):  # after every round, one shared model
        assert len({records[n][round_index]["model_hash"] for n in names}) == 1
    # round 1 met when every partner computed it would: three windows after the last of them was ready to train, by
    # their signed status records (not at the first finisher's proposal, raced through the DHT)
    first = [records[n][0] for n in names]
    assert len({r["swarm_ready"] for r in first}) == 1 and first[0]["swarm_ready"] > 0, first
    assert {r["meeting"] for r in first} == {math.ceil(first[0]["swarm_ready"] + 3 * ROUND_WINDOW)}, first

    # the checkpoints hold the same shared model, tensor by tensor
    models = [load_file(str(tmp_path / n / "ckpt" / "model.safetensors")) for n in names]
    expected_names = GPT(ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=64)).state_dict().keys()
    assert models[0].keys() == expected_names
    for other in models[1:]:
        assert other.keys() == models[0].keys()
        for key in models[0]:
            assert other[key].dtype == torch.float32
            assert torch.equal(other[key], models[0][key]), key


def test_a_peer_alone_keeps_training(procs, tmp_path):
    identity = tmp_path / "solo.key"  # created on first use, and the peer id comes from it
    popen = procs.start("solo", *join_args(tmp_path, "solo", 3, None, 2, "--identity", str(identity)))
    run_to_completion(procs, {"solo": popen})
    records = metrics(tmp_path, "solo")
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert {r["peer_id"] for r in records} == {load_or_create_identity(identity).to_base58()}
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["group_size"] == 1 and r["bytes_sent"] == 0 for r in records)
    assert all(r["inner_steps"] >= 10 for r in records)  # H steps or more in each round
    # each record is written after its round's steps (overlapped rounds: both may settle after the last step)
    assert records[0]["step"] >= records[0]["inner_steps"]
    assert records[1]["step"] >= records[0]["inner_steps"] + records[1]["inner_steps"]
    assert records[1]["loss"] < records[0]["loss"]
    assert "stopped after 2 rounds" in procs.log("solo")


def test_bootstrap_keeps_its_peer_id_across_restarts_and_sigkill_leaves_no_orphans(procs, tmp_path):
    identity, addr_file = tmp_path / "boot.key", tmp_path / "boot.addr"
    args = ["bootstrap", "--listen", LOOPBACK, "--identity", str(identity), "--addr-file", str(addr_file)]
    first = procs.start("boot1", *args)
    peer_id_1 = wait_for_file(addr_file, 60, first).split()[0].rsplit("/p2p/", 1)[1]
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=30) == 0
    addr_file.unlink()

    second = procs.start("boot2", *args)
    peer_id_2 = wait_for_file(addr_file, 60, second).split()[0].rsplit("/p2p/", 1)[1]
    assert peer_id_1 == peer_id_2
    assert_sigkill_leaves_no_orphans(procs, second, "boot2")


def test_sigkill_of_a_partner_leaves_no_orphans(procs, tmp_path):
    popen = procs.start("victim", *join_args(tmp_path, "victim", seed=5, bootstrap=None, rounds=100))
    assert_sigkill_leaves_no_orphans(procs, popen, "victim")


def assert_sigkill_leaves_no_orphans(procs, popen, name: str) -> None:
    deadline = time.monotonic() + 60
    children = []
    while time.monotonic() < deadline:  # wait until the DHT process and its p2pd are up
        children = psutil.Process(popen.pid).children(recursive=True)
        if any(c.name() == "p2pd" for c in children):
            break
        time.sleep(0.2)
    assert any(c.name() == "p2pd" for c in children), procs.log(name)
    procs.remember_children(popen)
    time.sleep(2)
    children = procs.remember_children(popen)
    os.kill(popen.pid, signal.SIGKILL)
    popen.wait(timeout=10)
    survivors = wait_gone(children, timeout=15)
    assert not survivors, [(p.pid, p.name()) for p in survivors]
