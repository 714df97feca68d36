"""Stop and resume with real processes: Ctrl-C mid-round checkpoints everything, a restart restores it exactly, and a
damaged checkpoint is refused without touching anything on disk."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import torch
from helpers import assert_user_error, join_args, tapestry
from safetensors.torch import load_file

from tapestry_p2p.testing.local_swarm import wait_for_file, wait_gone
from tapestry_p2p.training import checkpoint


def read_checkpoint(directory: Path) -> tuple:
    return load_file(str(directory / checkpoint.MODEL_FILE)), torch.load(directory / checkpoint.STATE_FILE)


def assert_same(a, b, where: str = "state") -> None:
    """Equal values all the way down; tensors compared element by element (bit for bit)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_stop_mid_round_resume_exactly_and_refuse_a_damaged_checkpoint(procs, bootstrap_addr, tmp_path):
    # blocking rounds: the claim is a checkpoint taken in the middle of round 2's inner steps (a resume with a round
    # in flight is tests/e2e/test_overlap.py's)
    args = join_args(
        tmp_path, "p", 1, bootstrap_addr, 100, "--run-id", "nobody-here", "--round-window", "6", "--no-overlap"
    )
    ckpt = tmp_path / "p" / "ckpt"

    # Ctrl-C in round 2 (SIGINT to the terminal's process group): the node checkpoints mid-round and exits 0
    first = procs.start("first", *args)
    wait_for_file(tmp_path / "p" / "metrics.jsonl", 90, first, tmp_path / "first.log")
    children = procs.remember_children(first)
    time.sleep(1.5)  # into round 2's inner steps (a peer alone trains until 2s before the end of the round window)
    os.killpg(first.pid, signal.SIGINT)
    assert first.wait(timeout=60) == 0, procs.log("first")[-2000:]
    log = procs.log("first")
    assert "stopped after" in log.strip().splitlines()[-1] and "Traceback" not in log
    assert "nobody else is in run 'nobody-here'" in log  # an unknown run id trains alone, with a warning
    assert not wait_gone(children, timeout=15)
    shared, state = read_checkpoint(ckpt)
    assert state["outer"]["round"] == 1 and len(state["round_losses"]) > 0  # saved in the middle of round 2

    # a restart restores every part of it: checkpointing again right away writes back exactly what was read
    second = procs.start("second", *args, "--min-peers", "2")  # waits for a partner, so it trains nothing
    deadline = time.monotonic() + 90
    while "waiting for 2 trainers" not in procs.log("second") and time.monotonic() < deadline:
        assert second.poll() is None, procs.log("second")[-2000:]
        time.sleep(0.5)
    assert f"{len(state['round_losses'])} steps into the next round" in procs.log("second")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0, procs.log("second")[-2000:]
    shared_again, state_again = read_checkpoint(ckpt)
    assert_same(shared, shared_again, "model.safetensors")
    for key in ("outer", "inner", "torch_rng", "round_losses", "model_hash"):  # inner: working model, AdamW, data
        assert_same(state[key], state_again[key], key)

    # a truncated checkpoint is refused, naming the file and the way out; nothing on disk changes
    model = ckpt / checkpoint.MODEL_FILE
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    before = {p: p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}
    assert_user_error(tapestry(*args), str(model), "truncated or corrupt", f"cp {ckpt / checkpoint.PREVIOUS}/*")
    assert {p: p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()} == before
    checkpoint.load(ckpt / checkpoint.PREVIOUS)  # the last good one is intact and readable

    # following the way out works; a checkpoint from a different model shape is refused the same way
    for path in (ckpt / checkpoint.PREVIOUS).iterdir():
        shutil.copy(path, ckpt / path.name)
    assert_user_error(tapestry(*args, "--n-embd", "32"), str(model), "another shape", "--checkpoint-dir")
