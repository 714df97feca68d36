"""Real hivemind DHT nodes and p2pd daemons on loopback, averaging through SwarmAveraging, the node's own path."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from helpers import start_signed_dht
from hivemind.utils import get_dht_time

from tapestry_p2p.comm.agreement import STATE_DIFFERS
from tapestry_p2p.comm.averaging import AveragingConfig, RoundMeta, SwarmAveraging
from tapestry_p2p.comm.codec import max_relative_error
from tapestry_p2p.comm.error_feedback import ErrorFeedback
from tapestry_p2p.p2p.dht import DHTOptions, start_dht, stop_dht, visible_maddrs

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
SHAPES = [torch.Size([300, 200]), torch.Size([1000]), torch.Size([7])]


def _no_state():
    return {}, []


@pytest.fixture
def swarm():
    """A bootstrap DHT plus a factory of peers (each on a DHT node that signs its records); everything is shut down
    afterwards."""
    with contextlib.ExitStack() as stack:
        boot = start_dht(DHTOptions(listen=LOOPBACK))
        stack.callback(stop_dht, boot)

        def make_peers(n: int, compression: str, run_id: str) -> list[SwarmAveraging]:
            peers = []
            for _ in range(n):
                dht, owner = start_signed_dht(stack, visible_maddrs(boot))
                feedback = None if compression == "none" else ErrorFeedback(SHAPES)
                config = AveragingConfig(SHAPES, compression, max_steps=100)
                peers.append(SwarmAveraging(dht, run_id, owner, config, _no_state, feedback=feedback))
                stack.callback(peers[-1].shutdown)
            return peers

        yield make_peers


def average_together(peers: list[SwarmAveraging], deltas, steps=None, rounds=None) -> list:
    """All peers call `average` at once for the same meeting, each from its own thread, like separate nodes; each
    declares the round of its shared model (`rounds`, all 0 by default)."""
    meeting = get_dht_time() + 3.0
    results = [None] * len(peers)
    steps = steps or [10] * len(peers)
    rounds = rounds or [0] * len(peers)

    def run(i):
        meta = RoundMeta(round=rounds[i], hash=f"model of round {rounds[i]}", steps=steps[i])
        results[i] = peers[i].average(deltas[i], meeting, meta)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(peers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


@pytest.mark.parametrize("n_peers,compression", [(2, "8bit"), (3, "8bit"), (3, "4bit"), (3, "none")])
def test_peers_get_the_mean_and_identical_values(swarm, n_peers, compression):
    peers = swarm(n_peers, compression, f"avg{n_peers}{compression}")
    generator = torch.Generator().manual_seed(n_peers)
    deltas = [[torch.randn(s, generator=generator) * (i + 1) for s in SHAPES] for i in range(n_peers)]
    results = average_together(peers, deltas)

    assert all(r.group_size == n_peers and r.failure is None for r in results), [
        (r.group_size, r.failure) for r in results
    ]
    # one group, the same for all: its id and its members, sorted
    assert len({r.group_id for r in results}) == 1 and results[0].group_id
    assert all(r.members == sorted(p.peer_id for p in peers) for r in results)
    if compression != "none":  # every peer sent parts through the codec, and owes what they lost
        assert all(any(r.abs().max() > 0 for r in p.feedback.residual) for p in peers)
    for k in range(len(SHAPES)):
        mean = sum(d[k] for d in deltas) / n_peers
        if compression == "none":
            tolerance = 1e-6 * mean.abs().max()
        else:  # each sender's part is quantized once, then the reducer's average once more
            eps = max_relative_error(compression)
            tolerance = eps * (max(d[k].abs().max() for d in deltas) + mean.abs().max()) + 1e-7
        for r in results:
            assert (r.averaged[k] - mean).abs().max() <= tolerance
        for r in results[1:]:  # bit for bit, not merely close
            assert torch.equal(r.averaged[k], results[0].averaged[k])
        if compression != "none":
            # error feedback: each peer's residual is exactly what its sent parts lost, so the reducers averaged
            # delta - residual, and the result is that average quantized once (by its reducer)
            sent = sum(d[k] - p.feedback.residual[k] for d, p in zip(deltas, peers, strict=True)) / n_peers
            assert (results[0].averaged[k] - sent).abs().max() <= eps * sent.abs().max() + 1e-6


def test_the_average_is_weighted_by_inner_steps(swarm):
    peers = swarm(3, "none", "weighted")
    deltas = [[torch.full(s, float(i + 1)) for s in SHAPES] for i in range(3)]  # 1, 2, 3
    results = average_together(peers, deltas, steps=[10, 30, 0])  # the third peer arrived with no steps
    expected = (10 * 1 + 30 * 2 + 0 * 3) / 40
    for r in results:
        assert r.group_size == 3
        assert all(torch.allclose(a, torch.full_like(a, expected), atol=1e-5) for a in r.averaged)


def test_a_peer_one_round_behind_is_not_averaged_with_the_next_round(swarm):
    """The round is part of the declarations' key: a peer whose shared model is a round behind (it missed one) meeting
    at the same time as the others goes alone, and its update, computed against the older model, is absent from
    theirs."""
    peers = swarm(3, "none", "rounds")
    deltas = [[torch.full(s, float(i + 1)) for s in SHAPES] for i in range(3)]  # 1, 2, and 3 from the late peer
    results = average_together(peers, deltas, rounds=[4, 4, 3])
    assert [r.group_size for r in results] == [2, 2, 1], [(r.group_size, r.failure) for r in results]
    for r in results[:2]:
        assert r.failure is None and all(torch.equal(a, torch.full_like(a, 1.5)) for a in r.averaged)
    assert results[2].left_out is None and results[2].members == [peers[2].peer_id]  # alone in its own round
    assert all(torch.equal(a, d) for a, d in zip(results[2].averaged, deltas[2], strict=True))


def test_a_peer_on_another_model_is_left_out_and_told_whom_to_follow(swarm):
    """Declarers of one round whose shared models differ: the majority's averages, the other applies nothing and
    learns who will hold the state the round ends on."""
    peers = swarm(3, "none", "states")
    deltas = [[torch.full(s, float(i + 1)) for s in SHAPES] for i in range(3)]
    meeting = get_dht_time() + 3.0
    metas = [RoundMeta(4, "ours", 10), RoundMeta(4, "ours", 10), RoundMeta(4, "a split", 10)]
    results: list = [None] * 3

    def run(i):
        results[i] = peers[i].average(deltas[i], meeting, metas[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [r.group_size for r in results] == [2, 2, 1]
    assert results[0].members == results[1].members == sorted(p.peer_id for p in peers[:2])
    assert results[2].left_out == STATE_DIFFERS and results[2].averaged == []
    assert results[2].others == sorted(p.peer_id for p in peers[:2])


def test_eight_bit_traffic_is_a_quarter_of_float32(swarm):
    peers8 = swarm(2, "8bit", "traffic8")
    peers32 = swarm(2, "none", "traffic32")
    generator = torch.Generator().manual_seed(7)
    deltas = [[torch.randn(s, generator=generator) for s in SHAPES] for _ in range(2)]
    r8 = average_together(peers8, deltas)
    r32 = average_together(peers32, deltas)
    for a, b in zip(r8, r32, strict=True):
        assert a.group_size == b.group_size == 2
        ratio = a.bytes_sent / b.bytes_sent
        assert 0.24 < ratio < 0.28, ratio  # 8 bits + a float32 scale per 1024 values, plus protobuf framing
        assert a.bytes_received / b.bytes_received < 0.28


def test_peer_alone_keeps_its_own_update(swarm):
    (peer,) = swarm(1, "8bit", "alone")
    delta = [torch.randn(s) for s in SHAPES]
    (result,) = average_together([peer], [delta])
    assert result.group_size == 1 and result.members == [peer.peer_id]
    assert result.left_out is None and result.failure is None  # alone: nobody else declared the round
    assert all(torch.equal(a, d) for a, d in zip(result.averaged, delta, strict=True))
