"""A run from a run spec with a Hugging Face model, on loopback (real `tapestry` processes): two partners share
`run.toml` (a tiny Llama-style config, BPE tokenizer, each partner's model folder in its own place) and average with
identical model hashes; a third joins with a spec that differs in one field, is never matched with them, and every
node says which field differs."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import metrics, run_to_completion, write_run_spec, write_text, write_tiny_llama, write_tiny_tokenizer

from tapestry_p2p.testing.local_swarm import LOOPBACK, LocalSwarm

pytestmark = pytest.mark.e2e
RUN = "hf-spec"
ROUNDS = 3


def partner(tmp_path: Path, name: str, seed: int, inner_steps: int) -> list[str]:
    """A partner folder with its own copy of the model files, data and spec; returns its `join` flags."""
    folder = tmp_path / name
    (folder / "model").mkdir(parents=True)
    data = write_text(folder / "data.txt", seed=seed, n_bytes=8000)
    write_tiny_llama(folder / "model", vocab_size=320)
    write_tiny_tokenizer(folder / "model" / "tokenizer.json", [write_text(tmp_path / "shared.txt", seed=0).read_text()])
    model = 'huggingface = "model"\ntokenizer = "model/tokenizer.json"\nblock_size = 16'
    spec = write_run_spec(folder / "run.toml", RUN, model, inner_steps=inner_steps)
    flags = ["--run-spec", str(spec), "--data", str(data), "--listen", LOOPBACK, "--partner", name]
    flags += ["--max-rounds", str(ROUNDS), "--threads", "1", "--round-window", "3", "--quiet"]
    return flags + ["--metrics", str(folder / "metrics.jsonl"), "--checkpoint-dir", str(folder / "ckpt")]


def test_partners_of_one_spec_average_and_a_partner_of_another_is_named_and_left_out(tmp_path):
    with LocalSwarm(tmp_path) as swarm:
        boot = swarm.start_bootstrap(run_id=RUN)
        procs = {
            name: swarm.start(
                name, "join", *partner(tmp_path, name, seed, steps), "--initial-peers", boot, "--min-peers", minimum
            )
            for name, seed, steps, minimum in [("north", 1, 10, "2"), ("south", 2, 10, "2"), ("odd", 3, 12, "1")]
        }
        run_to_completion(swarm, procs, timeout=240)
        logs = {name: swarm.log(name) for name in procs}
    north, south, odd = (metrics(tmp_path, name) for name in ("north", "south", "odd"))
    common = {r["round"] for r in north} & {r["round"] for r in south}
    assert common, (north, south)
    last = max(common)
    assert {r["model_hash"] for r in north + south if r["round"] == last} == {
        next(r["model_hash"] for r in north if r["round"] == last)
    }
    assert any(r["group_size"] == 2 for r in north)
    assert all(r["group_size"] == 1 for r in odd)  # never matched with a peer of another spec
    assert "inner_steps: 12 here, 10 there" in logs["odd"], logs["odd"][-3000:]
    assert "inner_steps: 10 here, 12 there" in logs["north"] + logs["south"]
