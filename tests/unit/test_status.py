"""Status records without a network (telemetry/status.py), the peer table drawn from them (app/monitor.py), and the
line `tapestry join` prints per round (app/join.py)."""

from __future__ import annotations

import pytest
from rich.console import Console

from tapestry_p2p.app.join import round_line
from tapestry_p2p.app.monitor import render
from tapestry_p2p.node.metrics import RoundMetrics
from tapestry_p2p.telemetry.status import PeerStatus, StatusPublisher, swarm_ready, trainers_online


def status(partner: str, **changes) -> PeerStatus:
    values = dict(
        peer_id=f"12D3Koo{partner}",
        partner=partner,
        region="eu-west",
        role="trainer",
        state="training",
        inner_step=120,
        round=4,
        loss=2.25,
        tokens_per_second=4000.0,
        bytes_sent_round=800_000,
        bytes_received_round=800_000,
        bytes_sent_total=3_200_000,
        bytes_received_total=3_100_000,
        group_size=3,
        round_seconds=7.5,
        compression="8bit",
        spec="0123456789abcdef",
        version="0.1.0",
        uptime=60.0,
        last_failure=None,
        refused={},
        clipped={},
        time=1000.0,
        ready=900.0,
    )
    return PeerStatus(**{**values, **changes})


def test_rendered_table_content_fits_80_columns():
    peers = [
        status("north-lab"),
        status("sur-uni", state="averaging", tokens_per_second=3500.0, time=999.0),
        status("ost-gmbh", time=990.0),  # silent for 10 s: stale
        status("boot", role="bootstrap", state="idle", round=0, loss=None, group_size=0, round_seconds=0.0),
    ]
    console = Console(record=True, width=80, color_system=None)
    console.print(render(peers, now=1000.0, title="swarm"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "peers online 3" in text and "tokens/s 7,500" in text and "round 4" in text
    assert "r/c" not in text  # the refused/clipped column appears only once someone was flagged
    rows = {
        line.split()[0]: line
        for line in text.splitlines()
        if line.split() and line.split()[0] in ("north-lab", "sur-uni", "ost-gmbh", "boot")
    }
    assert list(rows) == ["boot", "north-lab", "ost-gmbh", "sur-uni"]  # sorted by partner
    assert "training" in rows["north-lab"] and "2.250" in rows["north-lab"] and "3.2/3.1" in rows["north-lab"]
    assert "averaging" in rows["sur-uni"]
    assert "silent 10s" in rows["ost-gmbh"]
    assert "bootstrap" in rows["boot"]
    styled = Console(record=True, width=80, force_terminal=True)
    styled.print(render(peers, now=1000.0))
    assert "\x1b[2m" in styled.export_text(styles=True)  # the stale row is dimmed


def test_failures_are_listed_under_the_table_literally():
    peers = [
        status("north-lab", last_failure="internal error in the all-reduce: RuntimeError: boom"),
        status("[/]", last_failure="[red]not markup[/]"),
    ]
    console = Console(record=True, width=80, color_system=None)
    console.print(render(peers, now=1000.0))
    text = console.export_text()
    assert "north-lab round 4 failed: internal error in the all-reduce: RuntimeError: boom" in text
    assert "[/] round 4 failed: [red]not markup[/]" in text


def test_a_status_update_is_validated_where_it_is_made():
    publisher = StatusPublisher.disabled()
    with pytest.raises(ValueError, match="state"):
        publisher.update(state="trainig")
    with pytest.raises(ValueError, match="round"):
        publisher.update(round=-1)
    publisher.update(state="averaging", round=3)
    assert publisher.record().state == "averaging" and publisher.record().round == 3


def test_a_node_that_left_is_not_counted_as_online():
    peers = [status("a"), status("b", state="left"), status("c", role="bootstrap"), status("d", state="idle")]
    assert trainers_online(peers) == 2


def test_the_swarm_is_ready_when_the_last_of_count_trainers_was():
    peers = [
        status("a", ready=930.0),
        status("b", ready=910.0),
        status("c", ready=0.0),  # still joining
        status("d", ready=900.0, state="left"),
        status("boot", role="bootstrap", ready=905.0),
        status("e", ready=950.0),
    ]
    assert swarm_ready(peers, 2) == 930.0  # b, then a: a later trainer (e) does not move it
    assert swarm_ready(peers, 3) == 950.0
    assert swarm_ready(peers, 4) is None  # c is not ready, d left, a bootstrap node does not train


def test_a_peer_whose_contributions_were_refused_or_clipped_is_shown_to_everyone():
    bad = "12D3Kooost-gmbh"
    peers = [
        status("north-lab", refused={bad: 2}, clipped={bad: 1}),
        status("sur-uni", clipped={bad: 3}),
        status("ost-gmbh"),
    ]
    console = Console(record=True, width=80, color_system=None)
    console.print(render(peers, now=1000.0))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(" ") and line.split()}
    assert rows["ost-gmbh"][-1] == "2/4" and rows["north-lab"][-1] == "0/0"  # refused/clipped by the others
    assert "ost-gmbh (ost-gmbh): contributions refused 2x, clipped 4x by others" in text


def test_status_records_name_a_bounded_number_of_flagged_peers():
    with pytest.raises(ValueError, match="at most"):
        status("a", refused={f"peer{i}": 1 for i in range(40)})


def round_record(**changes) -> RoundMetrics:
    values = dict(round=7, step=140, inner_steps=20, loss=2.5, group_size=3, bytes_sent=1_200_000)
    values |= dict(bytes_received=1_100_000, round_seconds=4.25, time=1000.0, model_hash="0123456789abcdef")
    values |= dict(peer_id="12D3Kooa", partner="a", compression="8bit", failure=None, resynced=False)
    return RoundMetrics(**{**values, **changes})


def test_a_round_line_says_what_the_round_did_and_why_it_failed():
    assert round_line(round_record()).plain == (
        "round    7  loss  2.500  group 3  sent   1.20 MB  recv   1.10 MB    4.2s  model 0123456789abcdef"
    )
    alone = round_line(round_record(group_size=1, failure="no other peer came to the meeting")).plain
    assert "group 1 (alone)" in alone and alone.endswith("  no other peer came to the meeting")
    # a round with no inner step of ours (we re-synced just before the meeting) has no loss to show
    assert "loss    n/a  group 3" in round_line(round_record(inner_steps=0, loss=float("nan"))).plain
