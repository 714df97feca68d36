"""Loss reports (comm/losses.py) and the next meeting they carry (comm/matchmaking.Pace): what a report may say, whose
losses every member zeroes, and which proposal the group takes."""

from __future__ import annotations

import msgpack
import pytest

from tapestry_p2p.comm.losses import Report, agreed_losses, next_meeting
from tapestry_p2p.comm.matchmaking import Pace

GROUP = b"g" * 20


def test_a_report_round_trips_with_its_proposed_meeting():
    report = Report(GROUP, ("r1",), ("s1",), meeting=1234.0)
    assert Report.unpack(report.pack()) == report


@pytest.mark.parametrize(
    "fields",
    [
        [GROUP, [], [], True],  # (no meeting field)
        [GROUP, [], [], True, float("nan")],
        [GROUP, [], [], True, -1.0],
        [GROUP, [], [], True, "soon"],
        [b"", [], [], True, 0.0],
        [GROUP, ["x" * 500], [], True, 0.0],
        [GROUP, [], [], "yes", 0.0],
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


def test_the_next_meeting_is_the_earliest_members_proposal():
    members = ["a", "b", "c"]
    reports = {
        "a": Report(GROUP, meeting=1010.0),
        "b": Report(GROUP, meeting=1007.0),
        "c": Report(GROUP),  # (no proposal)
        "outsider": Report(GROUP, meeting=1001.0),
    }
    assert next_meeting(members, reports) == 1007.0
    assert next_meeting(members, {"c": reports["c"]}) == 0.0


def test_pace_proposes_after_our_next_inner_steps_or_after_the_round_on_the_grid():
    assert Pace().meeting(1000.0) == 0.0  # no proposal
    assert Pace(ready=1020.3, ahead=4.0).meeting(1000.0) == 1025.0  # (trains meanwhile: ready, then the window)
    assert Pace(ready=990.0, ahead=4.0).meeting(1000.2) == 1005.0  # steps done already: from now
    assert Pace(after=12.0, ahead=4.0).meeting(1000.5) == 1017.0  # a blocking round trains after it ends
