"""The node's state-sync policy (node/sync.py) on exact numbers: catching up into the swarm's round in flight.

The network is not what these tests are about: `Served` stands in for the swarm's answers (the state a majority
holds, as `comm.statesync` would elect it). tests/e2e/test_overlap.py runs the same path on real processes.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Optional

import torch

from tapestry_p2p.comm.averaging import SoloAveraging
from tapestry_p2p.comm.statesync.client import Download
from tapestry_p2p.comm.statesync.wire import StateId
from tapestry_p2p.node.sync import StateSync
from tapestry_p2p.training.outer import OuterConfig, SharedModel


def linear(values: list[float]) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([values]))
    return layer


def state_of(theta: list[float], momentum: list[float], round_no: int, in_flight: bool = False) -> Download:
    """A downloaded state, hashed as a SharedModel holding it would hash it."""
    holder = SharedModel(linear(theta), OuterConfig(lr=0.5, momentum=0.0))
    holder.load([torch.tensor([theta])], [torch.tensor([momentum])], round_no)
    tensors = [torch.tensor([theta]), torch.tensor([momentum])]
    return Download(StateId(round_no, holder.hash()), tensors, ["server"], in_flight=["server"] if in_flight else [])


class Served(SoloAveraging):
    """The swarm as the downloader sees it: the elected state at each call, in turn (None: no majority yet), and the
    highest position advertised (default: the latest answer's round)."""

    def __init__(self, answers: list[Optional[Download]], longest_round: float = 30.0, position: int = -1) -> None:
        self.answers, self.longest_round, self.asked = answers, longest_round, 0
        rounds = [a.state_id.round + bool(a.in_flight) for a in answers if a is not None]
        self.position = max(rounds, default=position)

    def highest_round_online(self) -> int:
        return self.position

    def positions(self) -> dict[str, int]:
        return {"server": self.position}

    def may_reach(self, round_no: int, peers) -> bool:
        return self.position == round_no  # (a server advertises the round it reaches once its round in flight settles)

    def download_state(self, min_round: int, peers=None, want=None, have=None) -> Optional[Download]:
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        if answer is None or answer.state_id.round < min_round:
            return None
        return replace(answer, tensors=[], held=True) if answer.state_id == have else answer


def node_state(theta: list[float], working: list[float]) -> tuple[StateSync, torch.nn.Linear, list[str]]:
    shared = SharedModel(linear(theta), OuterConfig(lr=0.5, momentum=0.0))
    model = linear(working)
    adopted: list[str] = []
    sync = StateSync(shared, model, threading.Lock())
    sync.on_adopt = lambda: adopted.append("adopted")
    return sync, model, adopted


def test_catching_up_while_the_swarm_averages_awaits_its_round_and_keeps_our_progress():
    sync, working, adopted = node_state([0.0, 0.0], [0.0, 0.0])
    # the swarm serves round 4 while its round 5 is in flight; round 5 settles on the second ask
    round4 = state_of([1.0, 2.0], [0.5, 0.5], 4, in_flight=True)
    round5 = state_of([0.75, 1.5], [0.25, 0.25], 5)
    sync.averaging = Served([round4, None, round5])

    caught_up = sync.catch_up(position=0)
    assert caught_up is round4 and caught_up.in_flight  # the node then awaits round 5 (Node._caught_up)
    assert sync.shared.round == 4 and adopted == ["adopted"]  # a plain adopt: our old round is dropped
    assert torch.equal(working.weight, torch.tensor([[1.0, 2.0]]))  # the working model restarts from theta_4
    with torch.no_grad():
        working.weight.sub_(torch.tensor([[0.125, 0.25]]))  # inner steps while round 5 is in flight

    sync.averaging = Served([None, round5])
    awaited = sync.await_round(5, ["server"], threading.Event())
    assert awaited is round5
    assert sync.adopt(awaited, 5, keep_progress=True)
    assert sync.shared.round == 5 and sync.shared.hash() == round5.state_id.hash
    assert torch.equal(working.weight, torch.tensor([[0.625, 1.25]]))  # theta_5 minus our progress since theta_4
    assert torch.equal(sync.shared.momentum_buffers()[0], torch.tensor([[0.25, 0.25]]))
    assert adopted == ["adopted"] and not sync.in_flight  # our progress, round losses and residual are kept
    assert torch.equal(sync.shared.pseudo_gradient(working)[0], torch.tensor([[0.125, 0.25]]))  # sent next round


def test_a_node_that_holds_the_swarms_state_awaits_its_round_in_flight_without_downloading():
    """A joiner on the initial model, while the swarm averages its first round: the same state, one round behind."""
    sync, working, adopted = node_state([1.0, 2.0], [0.875, 1.75])  # theta_0, and one inner step of ours
    swarm = state_of([1.0, 2.0], [0.0, 0.0], 0, in_flight=True)
    sync.averaging = Served([swarm])
    caught_up = sync.catch_up(position=0)
    assert caught_up is not None and caught_up.held and caught_up.in_flight and caught_up.tensors == []
    assert adopted == [] and torch.equal(working.weight, torch.tensor([[0.875, 1.75]]))  # nothing reset
    # the same state without a round in flight is not ahead of us: nothing to do
    sync.averaging = Served([state_of([1.0, 2.0], [0.0, 0.0], 0)], position=1)
    assert sync.catch_up(position=0) is None
    # a state of our round with another hash, held by the majority while it averages: taken
    other = state_of([0.5, 0.5], [0.0, 0.0], 0, in_flight=True)
    sync.averaging = Served([other])
    assert sync.catch_up(position=0) is other and sync.shared.hash() == other.state_id.hash and adopted == ["adopted"]


def test_an_awaited_round_is_taken_only_as_the_round_we_wait_for():
    sync, _, _ = node_state([0.0, 0.0], [0.0, 0.0])
    # the swarm moved two rounds on before we asked: that state is not the outcome of the round we missed
    sync.averaging = Served([state_of([1.0, 1.0], [0.0, 0.0], 7)])
    assert sync.await_round(6, ["server"], threading.Event()) is None
    # nobody settles it within the longest a round can take: we give up (and train on from our state)
    sync.averaging = Served([None], longest_round=0.6, position=6)
    assert sync.await_round(6, ["server"], threading.Event()) is None and sync.averaging.asked >= 2
    # none of its peers holds it or has a round in flight that could reach it (the group failed too): we give up
    sync.averaging = Served([None], position=5)
    assert sync.await_round(6, ["server"], threading.Event()) is None and sync.averaging.asked == 1
    # told to stop: we stop asking at once
    stop = threading.Event()
    stop.set()
    sync.averaging = Served([None])
    assert sync.await_round(6, ["server"], stop) is None and sync.averaging.asked == 0


def test_a_state_that_does_not_hash_to_what_its_servers_announced_is_not_taken_even_awaited():
    sync, working, _ = node_state([0.0, 0.0], [0.5, 0.5])
    forged = state_of([1.0, 2.0], [0.0, 0.0], 5)
    forged = Download(StateId(5, "0" * 16), forged.tensors, forged.servers)
    assert not sync.adopt(forged, 5, keep_progress=True)
    assert sync.shared.round == 0 and torch.equal(sync.shared.params[0], torch.tensor([[0.0, 0.0]]))
    assert torch.equal(working.weight, torch.tensor([[0.5, 0.5]]))


class Advertised(SoloAveraging):
    """Only the positions peers advertise (what `peers_ahead` reads)."""

    def __init__(self, positions: dict[str, int]) -> None:
        self.advertised = positions

    def positions(self) -> dict[str, int]:
        return self.advertised


def test_the_peers_to_catch_up_from_outnumber_those_in_step_with_us():
    sync, _, _ = node_state([0.0, 0.0], [0.0, 0.0])
    # a partner that split from us after a crash round runs ahead; the crashed one resumed far behind: it has no say
    sync.averaging = Advertised({"ahead": 9, "resumed": 1})
    assert sync.peers_ahead(5) == ["ahead"]
    # one peer claiming to be ahead of a peer in step with us wins nothing (S1 in the security review)
    sync.averaging = Advertised({"claims": 1_000_000, "in step": 5})
    assert sync.peers_ahead(5) == []
    # the swarm moved on without us: all of it
    sync.averaging = Advertised({"x": 7, "y": 7, "claims": 1_000_000, "in step": 5})
    assert sync.peers_ahead(5) == ["claims", "x", "y"]  # (then the state a majority of these holds is taken)
    sync.averaging = Advertised({"x": 5, "y": 4})
    assert sync.peers_ahead(5) == []


def test_a_peer_ahead_only_by_rounds_alone_defers_to_the_majority_behind_it():
    sync, _, _ = node_state([0.0, 0.0], [0.0, 0.0])
    sync.shared.round = 7  # we ran ahead alone for two rounds while two partners stayed at round 5
    sync.averaging = Advertised({"x": 5, "y": 5})
    assert sync.peers_to_follow(7) == ([], 0)  # rounds we averaged with others are ours to keep
    sync.solo_rounds = 2
    assert sync.peers_to_follow(7) == (["x", "y"], 4)  # (one of them may serve round 4 with round 5 in flight)
    assert sync.peers_ahead(7) == []  # they are not ahead of us
    sync.averaging = Advertised({"x": 5})  # one peer behind is no majority of the swarm: we keep our state
    assert sync.peers_to_follow(7) == ([], 0)
    sync.averaging = Advertised({"x": 5, "y": 5, "z": 7, "w": 7})  # two behind, one level: no strict majority
    assert sync.peers_to_follow(7) == ([], 0)
    sync.averaging = Advertised({"x": 2, "y": 2})  # further behind than our rounds alone: not ours to undo
    assert sync.peers_to_follow(7) == ([], 0)
