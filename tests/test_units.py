"""Fast tests of the pure parts: codec, outer optimizer, data, checkpoints, config, group agreement."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest
import torch
from conftest import write_text

from tapestry_p2p import checkpoint
from tapestry_p2p.allreduce import zero_spans
from tapestry_p2p.codec import BLOCK_SIZE, Blockwise8Bit, compression_for, max_relative_error
from tapestry_p2p.data import ByteBatches, DataError, load_text_bytes
from tapestry_p2p.model import GPT, ModelConfig, build_model
from tapestry_p2p.node import Node, NodeConfig
from tapestry_p2p.outer import OuterConfig, SharedModel
from tapestry_p2p.statesync import (
    StateInfo,
    agreed_after_failure,
    assign,
    canonical_state,
    pack_request,
    unpack_request,
)

TINY = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)


def roundtrip(tensor: torch.Tensor) -> torch.Tensor:
    codec = Blockwise8Bit()
    from hivemind.compression import CompressionInfo

    return codec.extract(codec.compress(tensor, CompressionInfo.from_tensor(tensor)))


def test_8bit_roundtrip_error_is_within_the_blockwise_bound():
    x = torch.randn(10 * BLOCK_SIZE + 17) * torch.linspace(0.01, 10, 10 * BLOCK_SIZE + 17)
    y = roundtrip(x)
    for start in range(0, len(x), BLOCK_SIZE):
        block = slice(start, start + BLOCK_SIZE)
        assert (y[block] - x[block]).abs().max() <= max_relative_error() * x[block].abs().max() + 1e-12
    assert torch.equal(roundtrip(x), y)  # deterministic
    assert max_relative_error() < 0.02


def test_8bit_wire_size_and_corrupt_input():
    from hivemind.compression import CompressionInfo

    x = torch.randn(4096)
    message = Blockwise8Bit().compress(x, CompressionInfo.from_tensor(x))
    assert len(message.buffer) == 4096 + 4 * 4
    message.buffer = message.buffer[:-1]
    with pytest.raises(ValueError, match="expected"):
        Blockwise8Bit().extract(message)
    with pytest.raises(ValueError, match="one of"):
        compression_for("3bit")


def test_outer_step_is_nesterov_sgd_and_reproducible():
    config = OuterConfig(lr=0.7, momentum=0.9)
    shared = SharedModel(build_model(TINY, seed=1), config)
    theta0 = [p.detach().clone() for p in shared.params]
    g1 = [torch.randn_like(p) for p in theta0]
    g2 = [torch.randn_like(p) for p in theta0]
    shared.apply(g1)
    shared.apply(g2)
    for t0, a, b, p in zip(theta0, g1, g2, shared.params):
        m1 = a  # momentum buffer after step 1
        t1 = t0 - 0.7 * (a + 0.9 * m1)
        m2 = 0.9 * m1 + b
        t2 = t1 - 0.7 * (b + 0.9 * m2)
        assert torch.allclose(p, t2, atol=1e-6)
    assert shared.round == 2

    twin = SharedModel(build_model(TINY, seed=1), config)
    twin.apply(g1)
    twin.apply(g2)
    assert twin.hash() == shared.hash()
    twin.apply(g1)
    assert twin.hash() != shared.hash()


def test_shared_state_can_be_adopted_exactly():
    a = SharedModel(build_model(TINY, seed=1), OuterConfig())
    a.apply([torch.randn_like(p) for p in a.params])
    b = SharedModel(build_model(TINY, seed=2), OuterConfig())
    b.load([p.detach().clone() for p in a.params], a.momentum_buffers(), a.round)
    assert b.hash() == a.hash() and b.round == 1
    g = [torch.randn_like(p) for p in a.params]
    a.apply(g)
    b.apply(g)
    assert b.hash() == a.hash()


def test_canonical_state_prefers_highest_round_then_majority_then_smallest_peer():
    gathered = {"b": {"round": 3, "hash": "x"}, "a": {"round": 3, "hash": "y"}, "c": {"round": 2, "hash": "z"}}
    assert canonical_state(gathered) == (3, "y")
    gathered["d"] = {"round": 3, "hash": "x"}
    assert canonical_state(gathered) == (3, "x")
    assert canonical_state({"e": {"round": "3", "hash": 5}}) is None


def test_after_a_failed_round_members_that_lost_nothing_win():
    states = {
        "a": {"round": 5, "hash": "zeroed", "clean": False},  # lost a reducer's answer: its span got no update
        "b": {"round": 5, "hash": "full", "clean": True},  # received everything
        "c": {"round": 5, "hash": "zeroed", "clean": False},
    }
    assert agreed_after_failure(states) == (5, "full")  # even against a majority
    states["b"]["clean"] = False
    assert agreed_after_failure(states) == (5, "zeroed")  # nobody clean: the canonical state


def test_state_download_is_split_evenly_across_servers():
    numel = [100, 5, 80, 20, 60, 1]
    plan = assign(numel, ["a", "b"])
    assert sorted(i for chosen in plan.values() for i in chosen) == list(range(len(numel)))  # each tensor once
    loads = sorted(sum(numel[i] for i in chosen) for chosen in plan.values())
    assert loads == [126, 140]  # largest first, each to the least-loaded server
    assert assign(numel, ["a", "b", "c"], indices=[1, 3]) == {"a": [3], "b": [1]}  # a failed server's share
    with pytest.raises(ValueError):
        assign(numel, [])


def test_state_messages_from_peers_are_validated():
    info = StateInfo(7, "abc", (3, 4))
    assert StateInfo.unpack(info.pack()) == info and info.nbytes == 28
    assert StateInfo.unpack(msgpack.packb({"round": 1, "hash": "x", "numel": [], "clean": "yes"})) is None
    for bad in (
        b"junk",
        msgpack.packb({"round": -1, "hash": "x", "numel": []}),
        msgpack.packb({"round": 1, "hash": 5, "numel": []}),
        msgpack.packb({"round": 1, "hash": "x"}),
    ):
        assert StateInfo.unpack(bad) is None  # fmt: skip
    assert unpack_request(pack_request("h", [0, 2]), 3) == ("h", [0, 2])
    assert unpack_request(pack_request(None, [3]), 3) is None  # out of range
    assert unpack_request(b"\x93", 3) is None


def test_a_failed_reducers_span_is_zeroed_across_tensor_boundaries():
    tensors = [torch.ones(2, 3), torch.ones(4)]
    assert zero_spans(tensors, [(4, 8)]) == 4  # the last 2 values of the first tensor, the first 2 of the second
    assert tensors[0].flatten().tolist() == [1, 1, 1, 1, 0, 0] and tensors[1].tolist() == [0, 0, 1, 1]


def test_data_from_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "bonjour"}) + "\n\n" + json.dumps({"text": "hola"}))
    (tmp_path / "ignored.csv").write_text("x,y")
    data = load_text_bytes(tmp_path, min_bytes=10)
    assert data == ("hello world " * 10 + "\n\nbonjour\n\nhola").encode()
    with pytest.raises(DataError, match="at least 1000"):
        load_text_bytes(tmp_path, min_bytes=1000)


def test_batches_are_next_byte_pairs_and_resumable():
    data = bytes(range(256)) * 4
    batches = ByteBatches(data, block_size=8, batch_size=4, seed=0)
    state = batches.state_dict()
    x, y = batches.next()
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    batches.load_state_dict(state)
    x2, _ = batches.next()
    assert torch.equal(x, x2)


@pytest.mark.parametrize(
    "make", [lambda: ModelConfig(n_embd=30, n_head=4), lambda: OuterConfig(momentum=1.0), lambda: OuterConfig(lr=0)]
)
def test_config_validation(make):
    with pytest.raises(ValueError):
        make()


def test_node_config_validation(tmp_path):
    with pytest.raises(ValueError, match="run id"):
        NodeConfig(run_id="has.dot", data=tmp_path)
    with pytest.raises(ValueError, match="inner steps"):
        NodeConfig(run_id="ok", data=tmp_path, inner_steps=0)


def solo_config(tmp_path, inner_steps: int, max_rounds: int) -> NodeConfig:
    """A tiny node with no network, checkpointing into tmp_path/ckpt."""
    data = write_text(tmp_path / "d.txt", seed=1)
    return NodeConfig(
        run_id="solo", data=data, solo=True, inner_steps=inner_steps, max_rounds=max_rounds,
        checkpoint_dir=tmp_path / "ckpt", model=TINY,
    )  # fmt: skip


def test_checkpoint_resume_restores_every_tensor(tmp_path):
    config = solo_config(tmp_path, inner_steps=3, max_rounds=2)
    first = Node(config)
    first.run()
    resumed = Node(config)
    assert resumed.resumed and resumed.shared.round == 2 and resumed.trainer.steps == 6
    for a, b in zip(first.shared.model.state_dict().values(), resumed.shared.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(first.trainer.model.state_dict().values(), resumed.trainer.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.shared.hash() == first.shared.hash()
    # the next step after resuming is the one the first node would have taken
    assert first.trainer.step() == resumed.trainer.step()


def test_truncated_checkpoint_is_refused_and_left_alone(tmp_path):
    config = solo_config(tmp_path, inner_steps=2, max_rounds=1)
    Node(config).run()
    model_file = tmp_path / "ckpt" / checkpoint.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:100])
    before = model_file.read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors is truncated or corrupt"):
        Node(config)
    assert model_file.read_bytes() == before


def test_model_state_dict_names_each_tensor_once():
    model = GPT(TINY)
    tensors = model.state_dict()
    assert len({t.data_ptr() for t in tensors.values()}) == len(tensors)


@pytest.mark.parametrize("config_file", sorted((Path(__file__).parent.parent / "peers").glob("*.toml")))
def test_example_partner_configs_parse(config_file):
    from tapestry_p2p.cli import _node_config, apply_config_file, build_parser

    parser = build_parser()
    argv = ["join", "--config", str(config_file)]
    apply_config_file(parser, "join", argv)
    config = _node_config(parser.parse_args(argv))
    assert config.run_id == "consortium-2026" and config.inner_steps == 100 and config.compression == "8bit"
    assert config.listen == ["/ip4/0.0.0.0/tcp/31340"]
