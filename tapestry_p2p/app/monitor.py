"""`tapestry monitor`: the live peer table, read from the signed status records in the DHT.

The monitor joins as a DHT client only (it trains nothing and serves nothing), reads `<run_id>_status` about once a
second and renders one row per peer, then one line per peer whose last round failed (with the reason). `render` is
also what `tapestry demo` shows. Peers silent for more than STALE_AFTER seconds are greyed out; their records expire
from the DHT a few seconds later and the row goes. Everything a record says is printed literally, never as markup.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import statistics
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Optional

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tapestry_p2p.node.session import SessionOptions, SwarmSession
from tapestry_p2p.p2p.dht import dht_time
from tapestry_p2p.security.consortium import Consortium
from tapestry_p2p.telemetry.status import STALE_AFTER, PeerStatus, flags_against

REFRESH_SECONDS = 1.0
STATE_STYLES = {"training": "green", "averaging": "cyan", "loading state": "yellow", "idle": "white", "left": "dim"}
CLIENT_LISTEN = ["/ip4/127.0.0.1/tcp/0"]  # a DHT client dials out only


def monitor_session(
    initial_peers: list[str],
    run_id: str,
    identity: Optional[Path] = None,
    consortium: Optional[Consortium] = None,
) -> SwarmSession:
    """A client-mode DHT node of the run (use as a context manager): with a throwaway identity in an open swarm, or
    with a key the consortium lists."""
    options = SessionOptions(
        run_id, initial_peers, CLIENT_LISTEN, identity=identity, client_mode=True, consortium=consortium
    )
    return SwarmSession(options)


def watch(
    initial_peers: list[str],
    run_id: str,
    mode: Literal["live", "once", "json"],
    console: Console,
    identity: Optional[Path] = None,
    consortium: Optional[Consortium] = None,
) -> int:
    """`tapestry monitor`: the live table, one snapshot, or one JSON snapshot."""
    with monitor_session(initial_peers, run_id, identity, consortium) as session:
        if mode == "json":
            print(snapshot_json(snapshot(session)))
        elif mode == "once":
            console.print(render(snapshot(session), dht_time(), f"tapestry swarm '{run_id}'"))
        else:
            with contextlib.suppress(KeyboardInterrupt):
                run_live(session, console)
    return 0


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f}"


def header(peers: list[PeerStatus], now: float) -> Text:
    """The swarm's totals over the peers that are not stale."""
    live = [p for p in peers if now - p.time <= STALE_AFTER and p.state != "left"]
    trainers = [p for p in live if p.role == "trainer"]
    tokens = sum(p.tokens_per_second for p in trainers)
    current = max((p.round for p in trainers), default=0)
    moved = sum(p.bytes_sent_total for p in peers)
    durations = [p.round_seconds for p in trainers if p.round_seconds > 0]
    per_round = f"{statistics.median(durations):.1f}s" if durations else "-"
    return Text.assemble(
        ("peers online ", "bold"),
        f"{len(live)}  ",
        ("tokens/s ", "bold"),
        f"{tokens:,.0f}  ",
        ("round ", "bold"),
        f"{current}  ",
        ("moved ", "bold"),
        f"{_megabytes(moved)} MB  ",
        ("per round ", "bold"),
        per_round,
    )


def render(peers: list[PeerStatus], now: float, title: str = "tapestry swarm") -> Group:
    """Header with totals, one row per peer sorted by partner, then the failures; fits an 80-column terminal."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("partner", overflow="ellipsis", no_wrap=True, max_width=14)
    table.add_column("region", overflow="ellipsis", no_wrap=True, max_width=7)
    table.add_column("state", no_wrap=True, min_width=13)
    for numeric in ("round", "loss", "tok/s", "MB tx/rx", "grp", "s/rnd"):
        table.add_column(numeric, justify="right", no_wrap=True)
    flagged_any = any(flags_against(peers, p.peer_id) != (0, 0) for p in peers)
    if flagged_any:  # contributions refused/clipped by the others: a column only when someone was
        table.add_column("r/c", justify="right", no_wrap=True, min_width=5)
    for p in sorted(peers, key=lambda p: (p.partner, p.peer_id)):
        silent = now - p.time
        stale = silent > STALE_AFTER
        state = f"silent {silent:.0f}s" if stale else p.state if p.role == "trainer" or p.state == "left" else p.role
        table.add_row(
            Text(p.partner),
            Text(p.region),
            Text(state, style="dim" if stale else STATE_STYLES.get(p.state, "white")),
            str(p.round) if p.role == "trainer" else "-",
            f"{p.loss:.3f}" if p.loss is not None else "-",
            f"{p.tokens_per_second:,.0f}" if p.role == "trainer" else "-",
            f"{_megabytes(p.bytes_sent_total)}/{_megabytes(p.bytes_received_total)}",
            str(p.group_size) if p.role == "trainer" else "-",
            f"{p.round_seconds:.1f}" if p.round_seconds else "-",
            *([_flags(peers, p)] if flagged_any else []),
            style="dim" if stale else None,
        )
    return Group(header(peers, now), table, *failures(peers), *flagged(peers))


def _flags(peers: list[PeerStatus], peer: PeerStatus) -> Text:
    refused, clipped = flags_against(peers, peer.peer_id)
    return Text(f"{refused}/{clipped}", style="bold red" if refused else "yellow" if clipped else "")


def flagged(peers: list[PeerStatus]) -> list[Text]:
    """One line per peer whose contributions its groupmates refused or clipped."""
    lines = []
    for p in sorted(peers, key=lambda p: (p.partner, p.peer_id)):
        refused, clipped = flags_against(peers, p.peer_id)
        if refused or clipped:
            who = f"{p.partner} ({str(p.peer_id)[-8:]})"
            lines.append(
                Text(
                    f"{who}: contributions refused {refused}x, clipped {clipped}x by others",
                    style="red" if refused else "yellow",
                    overflow="fold",
                )
            )
    return lines


def failures(peers: list[PeerStatus]) -> list[Text]:
    """One line per peer whose last round failed, with the reason it reports."""
    return [
        Text(f"{p.partner} round {p.round} failed: {p.last_failure}", style="yellow", overflow="fold")
        for p in sorted(peers, key=lambda p: (p.partner, p.peer_id))
        if p.last_failure
    ]


def snapshot_json(peers: list[PeerStatus]) -> str:
    return json.dumps([p.dict() for p in peers], indent=2)


@contextlib.contextmanager
def _keys_pressed() -> Iterator[threading.Event]:
    """An event set when the user presses `q` (only when stdin is a terminal); the terminal is restored on exit."""
    quit_pressed = threading.Event()
    if not sys.stdin.isatty():
        yield quit_pressed
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready and os.read(fd, 1) in (b"q", b"Q"):
                quit_pressed.set()
                return

    tty.setcbreak(fd)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield quit_pressed
    finally:
        stop.set()
        thread.join(timeout=1)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_live(session: SwarmSession, console: Console) -> None:
    """Refresh the table about once a second until Ctrl-C or `q`."""
    title = f"tapestry swarm '{session.options.run_id}' (q or Ctrl-C to quit)"
    with _keys_pressed() as quit_pressed, Live(console=console, auto_refresh=False, screen=False) as live:
        while not quit_pressed.is_set():
            live.update(render(session.peers(), dht_time(), title), refresh=True)
            quit_pressed.wait(REFRESH_SECONDS)


def snapshot(session: SwarmSession, settle_seconds: float = 3.0) -> list[PeerStatus]:
    """One reading, retried for a few seconds while the DHT returns nothing (it may still be joining)."""
    deadline = time.monotonic() + settle_seconds
    peers = session.peers()
    while not peers and time.monotonic() < deadline:
        time.sleep(0.5)
        peers = session.peers()
    return peers
