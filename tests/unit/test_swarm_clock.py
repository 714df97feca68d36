"""The swarm's clock (comm/swarm_clock.py): the median offset to peers, from round trips, bounded against liars."""

from __future__ import annotations

import pytest

from tapestry_p2p.comm.swarm_clock import MAX_OFFSET, SwarmClock, offset_of


def test_an_offset_is_measured_against_the_middle_of_the_round_trip():
    assert offset_of(requested=100.0, answered=100.2, theirs=100.6) == pytest.approx(0.5)
    assert offset_of(requested=100.0, answered=100.2, theirs=99.6) == pytest.approx(-0.5)


def test_two_partners_apart_by_a_second_both_settle_on_the_middle():
    ahead, behind = SwarmClock(), SwarmClock()
    ahead.update([-1.0])  # it sees the other one second behind
    behind.update([+1.0])
    assert ahead.offset == pytest.approx(-0.5) and behind.offset == pytest.approx(0.5)


def test_a_minority_of_lying_clocks_moves_nothing_and_absurd_ones_are_ignored():
    clock = SwarmClock()
    clock.update([0.01, -0.02, 0.0, 30.0, 25.0])  # two liars among five, our own zero counted too
    assert abs(clock.offset) <= 0.02
    clock.update([MAX_OFFSET * 10])
    assert abs(clock.offset) <= 0.02  # (nothing usable: the last offset stays)
