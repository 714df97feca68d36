"""Checkpoints (training/checkpoint.py) through a solo node: exact resume, damaged files refused and left alone,
another model's checkpoint refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import write_text

from tapestry_p2p.node.config import NodeConfig
from tapestry_p2p.node.node import Node
from tapestry_p2p.training import checkpoint
from tapestry_p2p.training.model import GPT, ModelConfig

TINY = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)


def solo_config(tmp_path, inner_steps: int, max_rounds: int) -> NodeConfig:
    """A tiny node with no network, checkpointing into tmp_path/ckpt."""
    data = write_text(tmp_path / "d.txt", seed=1)
    return NodeConfig(
        run_id="solo",
        data=data,
        solo=True,
        inner_steps=inner_steps,
        max_rounds=max_rounds,
        checkpoint_dir=tmp_path / "ckpt",
        model=TINY,
    )


def test_checkpoint_resume_restores_every_tensor(tmp_path):
    config = solo_config(tmp_path, inner_steps=3, max_rounds=2)
    first = Node(config)
    first.run()
    resumed = Node(config)
    assert resumed.resumed and resumed.shared.round == 2 and resumed.trainer.steps == 6
    for a, b in zip(first.shared.model.state_dict().values(), resumed.shared.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        first.trainer.model.state_dict().values(), resumed.trainer.model.state_dict().values(), strict=True
    ):
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


def test_a_checkpoint_records_its_model_and_refuses_another(tmp_path):
    config = solo_config(tmp_path, inner_steps=2, max_rounds=1)
    node = Node(config)
    node.run()
    model, model_config = checkpoint.load_model(tmp_path / "ckpt")  # built from the config the checkpoint records
    assert model_config == TINY
    for a, b in zip(model.state_dict().values(), node.shared.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    deeper = dataclasses.replace(config, model=dataclasses.replace(TINY, n_layer=2))
    with pytest.raises(checkpoint.CheckpointError, match=r"another shape \(n_layer: 1 there, 2 with these options\)"):
        Node(deeper)


def test_a_checkpoint_from_before_model_configs_resumes_or_is_refused_by_shape(tmp_path):
    config = solo_config(tmp_path, inner_steps=2, max_rounds=1)
    node = Node(config)
    node.run()
    state_file = tmp_path / "ckpt" / checkpoint.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    del state["model_config"]  # as the previous version wrote it
    torch.save(state, state_file)
    assert Node(config).shared.hash() == node.shared.hash()
    wider = dataclasses.replace(config, model=dataclasses.replace(TINY, n_embd=64))
    with pytest.raises(checkpoint.CheckpointError, match=r"another shape \(blocks.0.attn.proj.bias: \(32,\) there"):
        Node(wider)


def test_model_state_dict_names_each_tensor_once():
    model = GPT(TINY)
    tensors = model.state_dict()
    assert len({t.data_ptr() for t in tensors.values()}) == len(tensors)


def test_a_checkpoint_of_another_run_is_refused_and_left_alone(tmp_path):
    config = solo_config(tmp_path, inner_steps=2, max_rounds=1)
    Node(config).run()
    state_file = tmp_path / "ckpt" / checkpoint.STATE_FILE
    before = state_file.read_bytes()
    other = dataclasses.replace(config, run_id="other-run")  # its initial model differs too (the seed is the run's)
    with pytest.raises(checkpoint.CheckpointError, match=r"belongs to run 'solo', not 'other-run'"):
        Node(other)
    assert state_file.read_bytes() == before
    state = torch.load(state_file, weights_only=True)
    state["run"]["initial_model"] = "0" * 16  # same run id, another starting point
    torch.save(state, state_file)
    with pytest.raises(checkpoint.CheckpointError, match=r"a run started from initial model 000000000000"):
        Node(config)


def test_the_last_k_rounds_are_kept_for_a_roll_back(tmp_path):
    config = dataclasses.replace(solo_config(tmp_path, inner_steps=2, max_rounds=4), keep_checkpoints=2)
    node = Node(config)
    node.run()
    history = sorted(p.name for p in (tmp_path / "ckpt" / checkpoint.HISTORY).iterdir())
    assert history == ["round-000003", "round-000004"]
    rolled_back = Node(dataclasses.replace(config, checkpoint_dir=tmp_path / "ckpt" / "history" / "round-000003"))
    assert rolled_back.shared.round == 3 and rolled_back.shared.hash() != node.shared.hash()


def test_checkpoints_every_n_rounds_and_at_the_end(tmp_path):
    config = dataclasses.replace(solo_config(tmp_path, inner_steps=2, max_rounds=5), checkpoint_rounds=2)
    node = Node(config)
    node.run()
    history = sorted(p.name for p in (tmp_path / "ckpt" / checkpoint.HISTORY).iterdir())
    assert history == ["round-000002", "round-000004", "round-000005"][-config.keep_checkpoints :]
    resumed = Node(config)
    assert resumed.shared.round == 5 and resumed.shared.hash() == node.shared.hash()


def test_the_error_feedback_residual_survives_a_resume(tmp_path):
    config = dataclasses.replace(solo_config(tmp_path, inner_steps=2, max_rounds=1), solo=False, compression="4bit")
    node = Node(config)  # not run: no network is started before run()
    assert node.feedback is not None
    generator = torch.Generator().manual_seed(3)
    for residual in node.feedback.residual:
        residual.copy_(torch.randn(residual.shape, generator=generator))
    node.checkpoints.save([])
    resumed = Node(config)
    assert resumed.resumed
    for a, b in zip(node.feedback.residual, resumed.feedback.residual, strict=True):
        assert torch.equal(a, b)
    lossless = Node(dataclasses.replace(config, compression="none"))  # no codec error to feed back
    assert lossless.feedback is None and lossless.resumed
