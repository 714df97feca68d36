"""State sync policy and wire format (comm/statesync): the elected state, agreement after a failed round,
splitting a download, validating what peers send."""

from __future__ import annotations

import asyncio
import concurrent.futures

import msgpack
import pytest

from tapestry_p2p.comm.statesync import transport
from tapestry_p2p.comm.statesync.policy import agreed_after_failure, assign, elected_state
from tapestry_p2p.comm.statesync.transport import StateTransport
from tapestry_p2p.comm.statesync.wire import PeerState, StateId, StateInfo, pack_request, unpack_request


def test_the_state_a_majority_holds_is_elected_never_the_highest_round():
    honest = {"b": PeerState(3, "x"), "c": PeerState(3, "x")}
    assert elected_state({**honest, "a": PeerState(1_000_000, "zero")}) == StateId(3, "x")  # S1/S2: the liar loses
    assert elected_state({"a": PeerState(1_000_000, "zero"), "b": PeerState(3, "x")}) is None  # no majority: nothing
    assert elected_state({"a": PeerState(4, "y"), "b": PeerState(4, "y"), "c": PeerState(3, "x")}) == StateId(4, "y")
    assert elected_state({"b": PeerState(3, "x"), "a": PeerState(3, "y")}) == StateId(3, "y")  # one round: smallest id
    assert elected_state({"b": PeerState(3, "x")}) == StateId(3, "x")
    assert elected_state({}) is None


def test_after_a_failed_round_members_that_lost_nothing_win():
    states = {
        "a": PeerState(5, "zeroed", clean=False),  # lost a reducer's answer: its span got no update
        "b": PeerState(5, "full", clean=True),  # received everything
        "c": PeerState(5, "zeroed", clean=False),
    }
    assert agreed_after_failure(states) == StateId(5, "full")  # even against a majority
    states["b"] = PeerState(5, "full", clean=False)
    assert agreed_after_failure(states) == StateId(5, "zeroed")  # nobody clean: the elected state


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
    serving_before_its_round = StateInfo(7, "abc", (3, 4), clean=False, in_flight=True)
    assert StateInfo.unpack(serving_before_its_round.pack()) == serving_before_its_round
    good = {"round": 1, "hash": "x", "numel": [], "clean": True, "in_flight": False}
    assert StateInfo.unpack(msgpack.packb(good)) == StateInfo(1, "x", ())
    assert StateInfo.unpack(msgpack.packb({**good, "clean": "yes"})) is None
    assert StateInfo.unpack(msgpack.packb({**good, "in_flight": 1})) is None
    assert info.state == PeerState(7, "abc") and info.id == StateId(7, "abc")
    for bad in (
        b"junk",
        msgpack.packb({"round": -1, "hash": "x", "numel": []}),
        msgpack.packb({"round": 1, "hash": 5, "numel": []}),
        msgpack.packb({"round": 1, "hash": "x"}),
        msgpack.packb({**good, "round": True}),
        msgpack.packb({**good, "numel": [False]}),
        msgpack.packb({"round": 1, "hash": "x", "numel": [], "clean": True}),  # no in_flight
    ):
        assert StateInfo.unpack(bad) is None
    assert unpack_request(pack_request("h", [0, 2]), 3) == ("h", [0, 2])
    assert unpack_request(pack_request(None, [3]), 3) is None  # out of range
    assert unpack_request(b"\x93", 3) is None
    assert unpack_request(pack_request(None, [True]), 3) is None


class _Infos(StateTransport):
    """State infos over a fake network: each peer answers after its delay (None: never, a dead advertiser)."""

    def __init__(self, delays: dict[str, float | None]) -> None:
        self.delays = delays

    async def _ask_for_state(self, peer, want, indices, timeout, progress, max_bytes=0):  # type: ignore[override]
        delay = self.delays[peer]
        if delay is None:
            await asyncio.Event().wait()
        await asyncio.sleep(delay)
        return StateInfo(3, "h", (1,), True, False), []

    def infos(self, timeout: float) -> dict[str, StateInfo]:
        done: concurrent.futures.Future = concurrent.futures.Future()
        asyncio.run(self._state_infos(sorted(self.delays), timeout, done))
        return done.result()


def test_state_infos_wait_for_stragglers_a_grace_period_after_the_first_answer_not_the_whole_timeout(monkeypatch):
    """A dead advertiser used to hold every download for the whole timeout, while a swarm of short rounds moved past
    the state it elected; now the others have `info_grace` after the first answer (here 0.3 s of a 60 s timeout)."""
    monkeypatch.setattr(transport, "INFO_GRACE", 0.3)
    infos = _Infos({"a": 0.0, "b": 0.05, "slow": 5.0, "dead": None}).infos(timeout=60.0)
    assert sorted(infos) == ["a", "b"]
    assert _Infos({"dead": None, "late": 0.2}).infos(timeout=0.1) == {}  # nobody within the timeout: nothing
    assert transport.info_grace(0.1) == 0.3 and transport.info_grace(4.0) == 8.0  # twice a slow first answer
