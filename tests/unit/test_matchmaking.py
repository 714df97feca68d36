"""The meeting clock against a fake DHT: proposals on a grid of whole seconds, the first round one window later,
and only catchable, finite proposals read from the network."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from tapestry_p2p.comm.matchmaking import MeetingClock, RoundSchedule

NOW = 1000.7  # the swarm's time in these tests (frozen)


class FakeDHT:
    """One key's subkeys, as hivemind returns them; `store` records what we proposed."""

    def __init__(self, others: dict[bytes, object]) -> None:
        self.others = others
        self.stored: list[float] = []
        self.stored_event = threading.Event()

    def get(self, key: str, latest: bool = False) -> SimpleNamespace:
        return SimpleNamespace(value={k: SimpleNamespace(value=v) for k, v in self.others.items()})

    def store(self, key: str, value: float, expiration_time: float, subkey: bytes) -> bool:
        self.others[subkey] = value
        self.stored.append(value)
        self.stored_event.set()
        return True


def until(condition: Callable[[], bool]) -> None:
    """Until `condition` holds: the clock's background thread reads the key at once (10 s at most here)."""
    waits = threading.Event()
    for _ in range(200):
        if condition():
            return
        waits.wait(0.05)


@pytest.fixture
def clock_with():
    clocks = []

    def make(others: dict[bytes, object], window: float = 3.0) -> tuple[MeetingClock, FakeDHT]:
        dht = FakeDHT(dict(others))
        clock = MeetingClock(dht, "run.spec", 1, RoundSchedule(window), b"us", now=lambda: NOW)  # type: ignore[arg-type]
        clocks.append(clock)
        return clock, dht

    yield make
    for clock in clocks:
        clock.close()


@pytest.mark.parametrize("first,expected", [(False, 1004.0), (True, 1007.0)])
def test_a_proposal_is_a_whole_second_one_window_later_in_a_first_round(clock_with, first, expected):
    clock, dht = clock_with({})
    clock.propose(first=first)
    assert clock.meeting == expected  # ceil(1000.7 + 3), and one window more
    assert dht.stored_event.wait(5) and dht.stored == [expected]


def test_only_finite_catchable_proposals_count(clock_with):
    others = {b"a": float("nan"), b"b": "1002.0", b"c": NOW + 0.2, b"d": NOW + 60.0, b"e": NOW + 4.0}
    clock, _ = clock_with(others)
    until(lambda: clock.meeting is not None)
    assert clock.meeting == NOW + 4.0  # (too soon to catch, too far ahead, not a number, NaN: ignored)


def test_an_earlier_proposal_read_after_a_later_one_wins(clock_with):
    """Under load an earlier proposal can reach the replicas we read after a later one: the clock keeps reading."""
    clock, dht = clock_with({b"late": NOW + 5.0})
    until(lambda: clock.meeting is not None)
    assert clock.meeting == NOW + 5.0
    dht.others[b"early"] = NOW + 4.0  # lands now
    until(lambda: clock.meeting != NOW + 5.0)
    assert clock.meeting == NOW + 4.0


def test_a_slow_dht_calls_the_meeting_farther_ahead_but_never_past_what_peers_accept():
    from tapestry_p2p.comm.voting import Timing

    assert Timing().ahead(4.0, 0.1) == 4.0  # a quick DHT: the window
    assert Timing().ahead(4.0, 2.4) == pytest.approx(0.5 + 0.5 + 3 * 2.4 + 1.0)
    dht = FakeDHT({})
    clock = MeetingClock(dht, "run.spec", 1, RoundSchedule(3.0), b"us", now=lambda: NOW, ahead=60.0)  # type: ignore[arg-type]
    try:
        clock.propose()
        assert clock.meeting == 1010.0  # ceil(1000.7 + 3 windows): the farthest a peer takes a proposal
    finally:
        clock.close()


@pytest.mark.parametrize(
    "ready,expected",
    [
        (NOW - 3.0, 1007.0),  # ceil(997.7 + 3 windows): every partner computes it from the same records
        (NOW, 1010.0),
        (NOW - 9.5, None),  # passed, or too near to catch: we are late, the usual path
        (NOW + 30.0, None),  # a forged ready time: farther ahead than a proposal is taken
    ],
)
def test_a_fresh_runs_first_meeting_is_computed_from_when_the_swarm_was_ready(clock_with, ready, expected):
    clock, dht = clock_with({})
    clock.start(ready)
    assert clock.meeting == expected
    if expected is not None:
        assert dht.stored_event.wait(5) and dht.stored == [expected]  # peers that read other records learn it


def test_a_meeting_that_just_passed_is_missed_until_attended_or_old():
    others = {b"a": NOW - 2.0, b"b": NOW + 0.2, b"old": NOW - 30.0}
    clock, _ = clock_for(others)
    until(lambda: clock.missed is not None)
    assert clock.meeting is None and clock.missed == NOW - 2.0  # (one older than `ahead` is not a meeting we missed)
    clock.close()
    attended, _ = clock_for(others, attended=NOW - 2.0)
    until(lambda: attended.missed is not None)
    assert attended.missed == NOW + 0.2  # too near to catch, and not the one we went to
    attended.close()


def clock_for(others: dict[bytes, object], attended: float = float("-inf")) -> tuple[MeetingClock, FakeDHT]:
    dht = FakeDHT(dict(others))
    schedule = RoundSchedule(3.0)
    return MeetingClock(dht, "run.spec", 1, schedule, b"us", now=lambda: NOW, attended=attended), dht  # type: ignore[arg-type]


def test_a_member_with_many_keys_cannot_grow_what_the_clock_keeps(clock_with):
    others: dict[bytes, object] = {bytes([i]): NOW + 5.0 + i / 100 for i in range(200)}
    others.update({b"p" + bytes([i]): NOW - 1.0 - i / 100 for i in range(100)})
    clock, _ = clock_with(others)
    until(lambda: clock.meeting is not None)
    assert clock.meeting == NOW + 5.0 and clock.missed == pytest.approx(NOW - 1.99)
    assert len(clock._seen) == 2 * 16  # the earliest of those to come and of those passed
