"""Round sequences of a real Node (node/node.py, node/rounds.py) against a scripted network, in this process: the
network's answers are what each test says they are (`Scripted`), the meeting is called as soon as the H steps are
done (`Immediately`). The values are exact: an averaged round applies its average, a round we were left out of applies
nothing and takes the state it ends on, keeping our progress. tests/e2e/test_overlap.py runs the same paths on real
processes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import pytest
import torch

from tapestry_p2p.comm.averaging import AveragingResult, RoundMeta, SoloAveraging
from tapestry_p2p.comm.statesync.client import Download
from tapestry_p2p.comm.statesync.wire import StateId
from tapestry_p2p.node.config import NodeConfig
from tapestry_p2p.node.node import Node
from tapestry_p2p.p2p.dht import dht_time
from tapestry_p2p.testing.corpus import write_text
from tapestry_p2p.training.model import ModelConfig
from tapestry_p2p.training.outer import OuterConfig, SharedModel

H = 2
Answer = Callable[[Sequence[torch.Tensor], RoundMeta], AveragingResult]


class Scripted(SoloAveraging):
    """The network as the node sees it: each round's result in turn; the swarm's states to download."""

    peer_id = "me"

    def __init__(self, answers: list[Answer], states: Optional[list[Download]] = None) -> None:
        self.answers, self.states = answers, states or []
        self.metas: list[RoundMeta] = []
        self.meetings: list[float] = []
        self.published: list[int] = []
        self.intents: list[tuple[int, str]] = []
        self.longest_round = 5.0

    def average(self, delta: Sequence[torch.Tensor], meeting: float, meta: RoundMeta) -> AveragingResult:
        self.metas.append(meta)
        self.meetings.append(meeting)
        return self.answers.pop(0)(delta, meta)

    def publish_round(self, round_no: int) -> None:
        self.published.append(round_no)

    def intend(self, meeting: float, round_no: int, state_hash: str) -> None:
        self.intents.append((round_no, state_hash))

    def download_state(self, min_round: int, peers=None, want=None, have=None) -> Optional[Download]:
        held = [s for s in self.states if s.state_id.round >= min_round]
        return held[0] if held else None

    def may_reach(self, round_no: int, peers) -> bool:
        return any(s.state_id.round == round_no - 1 and s.in_flight for s in self.states)


class Immediately:
    """A meeting clock that calls the meeting as soon as we have our H steps."""

    meeting: Optional[float] = None
    missed: Optional[float] = None  # (a meeting of this round that just passed)

    def propose(self, first: bool = False) -> None:
        self.meeting = dht_time() + 60

    def agree(self, meeting: float) -> None:
        self.meeting = meeting if self.meeting is None else min(self.meeting, meeting)

    def should_stop_training(self, step_seconds: float = 0.0) -> bool:
        return self.meeting is not None

    def close(self) -> None:
        pass


class ScriptedNode(Node):
    """A node whose swarm is `Scripted` (no DHT, no processes)."""

    def __init__(self, config: NodeConfig, network: Scripted) -> None:
        super().__init__(config)
        self.network = network
        self.records: list = []
        self.on_round = self.records.append

    def _join_swarm(self, stack: contextlib.ExitStack) -> None:
        self.session = object()  # type: ignore[assignment]  # (only its presence matters to the round loop)
        self.sync.averaging = self.network
        self.network.publish_round(self.rounds.position)

    def _meeting_clock(self, round_no: int) -> Immediately:  # type: ignore[override]
        return Immediately()


def averaged(group: float) -> Answer:
    """Every member's pseudo-gradient was `group` x ours: the group's average is that."""

    def answer(delta: Sequence[torch.Tensor], meta: RoundMeta) -> AveragingResult:
        return AveragingResult([d * group for d in delta], group_size=2, members=["me", "you"], group_id="ab")

    return answer


def left_out(reason: str, others: list[str]) -> Answer:
    def answer(delta: Sequence[torch.Tensor], meta: RoundMeta) -> AveragingResult:
        return AveragingResult([], group_size=1, members=["me"], left_out=reason, others=others, failure=reason)

    return answer


@pytest.fixture
def config(tmp_path: Path) -> NodeConfig:
    model = ModelConfig(block_size=16, n_layer=1, n_head=1, n_embd=16)
    data = write_text(tmp_path / "data.txt", seed=1)
    from tapestry_p2p.training.inner import TrainConfig

    return NodeConfig(data=data, inner_steps=H, max_rounds=3, model=model, train=TrainConfig(batch_size=2), threads=1)


def theta(node: Node) -> list[torch.Tensor]:
    return [p.detach().clone() for p in node.shared.params]


def working(node: Node) -> list[torch.Tensor]:
    return [p.detach().clone() for p in node.trainer.model.parameters()]


def test_a_blocking_round_is_a_launch_settled_at_once(config):
    node = ScriptedNode(config, Scripted([averaged(0.5)]))
    node.config.overlap = False
    node.config.max_rounds = 1
    before = theta(node)
    node.run()
    assert node.shared.round == 1 and [r.round for r in node.records] == [1]
    assert node.records[0].members == ["me", "you"] and node.records[0].left_out is None
    assert all(torch.equal(w, t) for w, t in zip(working(node), theta(node), strict=True))  # progress is zero
    assert any(not torch.equal(b, a) for b, a in zip(before, theta(node), strict=True))


def test_an_overlapped_round_applies_its_average_keeping_the_progress_since_its_launch(config):
    network = Scripted([averaged(1.0), averaged(1.0)])
    node = ScriptedNode(config, network)
    node.config.max_rounds = 2
    node.run()
    assert [r.round for r in node.records] == [1, 2] and node.shared.round == 2
    assert [m.round for m in network.metas] == [0, 1]  # round 2 was declared against round 1's shared model
    # averaging our own delta (group = 1x ours) at lr 0.7 momentum 0.9 moves theta; the working model kept its steps
    assert all(r.inner_steps >= H for r in node.records)


def test_a_round_we_were_left_out_of_applies_nothing_and_takes_the_state_it_ends_on(config):
    node = ScriptedNode(config, Scripted([]))
    tensors = theta(node)
    tensors = [t + 0.25 for t in tensors]  # the group's round 1 moved theta by 0.25 everywhere
    momentum = [torch.zeros_like(t) for t in tensors]
    holder = SharedModel(node.shared.model.__class__(node.config.model), OuterConfig())
    holder.load(tensors, momentum, 1)
    state = Download(StateId(1, holder.hash()), tensors + momentum, ["you"])
    node.network.answers = [left_out("declared late", ["you"]), averaged(1.0)]
    node.network.states = [state]
    node.config.max_rounds = 2
    ours = node.shared.hash()
    node.run()
    first, second = node.records
    assert first.round == 1 and first.left_out == "declared late" and first.members == ["me"]
    assert first.model_hash == ours  # nothing of ours was applied
    # round 2 was declared against the swarm's round 1, taken from "you" keeping our progress
    assert node.network.metas[1].round == 1 and node.network.metas[1].hash == holder.hash()
    assert node.network.intents == [(0, ours), (1, holder.hash())]  # declared as soon as the state was held
    assert second.round == 2 and node.shared.round == 2


def test_a_left_out_round_nobody_comes_to_hold_is_met_again(config):
    network = Scripted([left_out("no agreement", ["you"]), averaged(1.0)])
    node = ScriptedNode(config, network)
    node.config.max_rounds = 2
    node.run()
    assert [r.round for r in node.records] == [1, 1]  # the same round, met again: nobody applied it
    assert [m.round for m in network.metas] == [0, 0]
    assert node.records[1].left_out is None and node.shared.round == 1


class MissedIt(Immediately):
    """The others met for the round while we were busy: the meeting passed before our update was ready."""

    missed = 1234.0

    def propose(self, first: bool = False) -> None:
        raise AssertionError("a node that missed the round's meeting must not call another one")


def test_a_node_that_missed_the_meeting_goes_to_it_late_and_follows_its_group(config):
    class Late(ScriptedNode):
        def _meeting_clock(self, round_no: int) -> MissedIt:  # type: ignore[override]
            return MissedIt()

    network = Scripted([left_out("declared late", [])])
    node = Late(config, network)
    node.config.max_rounds = 1
    node.run()
    assert network.meetings == [1234.0]  # declared for the meeting the others met at, not a new one
    assert node.records[0].left_out == "declared late" and node.shared.round == 0


def test_the_next_meeting_is_the_one_the_group_agreed_on_in_its_last_round(config):
    def with_next_meeting(delta: Sequence[torch.Tensor], meta: RoundMeta) -> AveragingResult:
        result = averaged(1.0)(delta, meta)
        result.next_meeting, result.group_round = 4321.0, meta.round + 1
        return result

    network = Scripted([with_next_meeting, averaged(1.0)])
    node = ScriptedNode(config, network)
    node.config.overlap = False
    node.config.max_rounds = 2
    node.run()
    assert network.meetings[1] == 4321.0 and node.records[0].next_meeting == 4321.0
    assert network.metas[0].pace.after > 0 and network.metas[0].pace.ahead == config.schedule.window  # (blocking)
