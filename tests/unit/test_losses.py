"""Loss reports (comm/losses.py) and the next meeting they carry (comm/matchmaking.Pace): what a report may say, whose
losses every member zeroes, and which proposal the group takes."""

from __future__ import annotations

import msgpack
import pytest

from tapestry_p2p.comm.losses import Report, agreed_losses, proposals_of
from tapestry_p2p.comm.matchmaking import NextMeeting, Pace, agreed_meeting

GROUP = b"g" * 20


def test_a_report_round_trips_with_its_proposed_meeting():
    report = Report(GROUP, ("r1",), ("s1",), proposal=NextMeeting(1234.0, 1200.0, 4.0))
    assert Report.unpack(report.pack()) == report
    assert Report.unpack(Report(GROUP).pack()) == Report(GROUP)


@pytest.mark.parametrize(
    "fields",
    [
        [GROUP, [], [], True],  # (no proposal field)
        [GROUP, [], [], True, [1.0, float("nan"), 1.0]],
        [GROUP, [], [], True, [1.0, -1.0, 1.0]],
        [GROUP, [], [], True, [1.0, 2.0]],
        [GROUP, [], [], True, "soon"],
        [b"", [], [], True, []],
        [GROUP, ["x" * 500], [], True, []],
        [GROUP, [], [], "yes", []],
    ],
)
def test_malformed_reports_are_refused(fields):
    assert Report.unpack(msgpack.packb(fields)) is None


def test_every_member_zeroes_the_union_of_members_losses_except_one_its_reducer_refused():
    members = ["a", "b", "c"]
    reports = {
        "a": Report(GROUP, lost=("b",)),
        "b": Report(GROUP, refused=("c",)),
        "c": Report(GROUP, lost=("b", "stranger")),  # c lost b's span, but b refused c's parts: c's own doing
        "outsider": Report(GROUP, lost=("a",)),
    }
    assert agreed_losses(members, reports) == {"b"}  # (a's loss of b counts; a stranger or outsider never does)
    assert agreed_losses(members, {"c": reports["c"], "b": reports["b"]}) == set()


def test_the_next_meeting_follows_the_first_ready_and_the_last_to_finish_the_round():
    members = ["a", "b", "c"]
    reports = {
        "a": Report(GROUP, proposal=NextMeeting(ready=1030.0, finished=1001.0, ahead=4.0)),
        "b": Report(GROUP, proposal=NextMeeting(ready=1020.0, finished=1002.0, ahead=6.0)),
        "c": Report(GROUP),  # (no proposal)
        "outsider": Report(GROUP, proposal=NextMeeting(ready=1000.0, finished=1000.0, ahead=1.0)),
    }
    proposals = proposals_of(members, reports)
    assert agreed_meeting(proposals, now=1003.0, limit=12.0) == 1026.0  # b ready first, the longest ahead
    late = proposals + [NextMeeting(ready=1021.0, finished=1019.5, ahead=2.0)]  # one finished its all-reduce late
    assert agreed_meeting(late, now=1020.0, limit=12.0) == 1026.0  # (1019.5 + 6 rounds up to 1026)
    liar = proposals + [NextMeeting(ready=5000.0, finished=9000.0, ahead=1e9)]  # pushing the meeting away
    assert agreed_meeting(liar, now=1003.0, limit=12.0) == 1032.0  # finished taken at now, ahead at the limit
    assert agreed_meeting([], now=1003.0, limit=12.0) == 0.0
    # a member's proposal is missing (it died mid-round): the others may wait for its report, up to `waited`
    assert agreed_meeting(proposals, now=1003.0, limit=12.0, waited=12.0) == 1026.0  # (b's H steps come later still)
    assert agreed_meeting(late, now=1020.0, limit=12.0, waited=12.0) == 1038.0  # 1019.5 + 12 + 6


def test_pace_proposes_after_our_next_inner_steps_or_after_the_round():
    assert Pace().at(1000.0) is None  # no proposal
    assert Pace(ready=1020.3, ahead=4.0).at(1000.0) == NextMeeting(1020.3, 1000.0, 4.0)  # (trains meanwhile)
    assert Pace(after=12.0, ahead=4.0).at(1000.5) == NextMeeting(1012.5, 1000.5, 4.0)  # trains after the round
