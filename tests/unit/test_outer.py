"""The outer step (training/outer.py): Nesterov SGD, reproducible hashes, adopting a state exactly."""

from __future__ import annotations

import torch

from tapestry_p2p.training.model import ModelConfig, build_model
from tapestry_p2p.training.outer import OuterConfig, SharedModel

TINY = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)


def test_outer_step_is_nesterov_sgd_and_reproducible():
    config = OuterConfig(lr=0.7, momentum=0.9)
    shared = SharedModel(build_model(TINY, seed=1), config)
    theta0 = [p.detach().clone() for p in shared.params]
    g1 = [torch.randn_like(p) for p in theta0]
    g2 = [torch.randn_like(p) for p in theta0]
    shared.apply(g1)
    shared.apply(g2)
    for t0, a, b, p in zip(theta0, g1, g2, shared.params, strict=True):
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


def test_overlapped_rounds_apply_each_average_one_round_late_and_keep_local_progress():
    """node/rounds.py's rule on numbers exactly representable in float32 (outer SGD, lr 0.5, no momentum)."""
    shared = SharedModel(torch.nn.Linear(2, 1, bias=False), OuterConfig(lr=0.5, momentum=0.0))
    working = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        shared.params[0].copy_(torch.tensor([[1.0, 2.0]]))
    shared.copy_into(working)

    def train(step: list[float]) -> None:  # stands in for inner steps: the working model moves by `step`
        with torch.no_grad():
            working.weight.sub_(torch.tensor([step]))

    train([0.125, 0.25])  # round 1's inner steps
    delta1 = shared.pseudo_gradient(working)  # launched at round 1's meeting; training goes on, no reset
    assert torch.equal(delta1[0], torch.tensor([[0.125, 0.25]]))
    train([0.25, 0.5])  # round 2's inner steps, while round 1 is in flight
    average1 = [torch.tensor([[0.5, 1.0]])]  # the group's average of round 1, arrived during round 2
    shared.apply_keeping_progress(average1, working, delta1)  # at round 2's meeting
    assert torch.equal(shared.params[0], torch.tensor([[0.75, 1.5]]))  # theta_1 = theta_0 - 0.5 * average_1
    assert torch.equal(working.weight, torch.tensor([[0.5, 1.0]]))  # theta_1 minus round 2's own progress
    assert shared.round == 1
    delta2 = shared.pseudo_gradient(working)  # launched at round 2's meeting: exactly round 2's progress
    assert torch.equal(delta2[0], torch.tensor([[0.25, 0.5]]))

    # a blocking round is the same rule with nothing trained in between: the working model restarts from theta
    shared.apply_keeping_progress([torch.tensor([[0.25, 0.5]])], working, delta2)
    assert torch.equal(shared.params[0], torch.tensor([[0.625, 1.25]]))
    assert torch.equal(working.weight, shared.params[0])
