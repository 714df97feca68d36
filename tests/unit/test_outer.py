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
