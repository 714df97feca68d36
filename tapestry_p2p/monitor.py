"""`tapestry monitor`: the live peer table, read from the signed status records in the DHT.

The monitor joins as a DHT client only (it trains nothing and serves nothing), reads `<run_id>_status` about once a
second and renders one row per peer. `render` is also what `tapestry demo` shows. Peers silent for more than
STALE_AFTER seconds are greyed out; their records expire from the DHT a few seconds later and the row goes.
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
from dataclasses import dataclass
from typing import Iterator, List

from hivemind.dht import DHT
from hivemind.utils import get_dht_time
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tapestry_p2p.swarm import DHTOptions, ephemeral_identity, start_dht, stop_dht
from tapestry_p2p.telemetry import STALE_AFTER, PeerStatus, read_statuses, signing_key, validators

REFRESH_SECONDS = 1.0
STATE_STYLES = {"training": "green", "averaging": "cyan", "loading state": "yellow", "idle": "white"}


@dataclass
class MonitorConfig:
    initial_peers: List[str]
    run_id: str


@contextlib.contextmanager
def monitor_dht(config: MonitorConfig) -> Iterator[DHT]:
    """A client-mode DHT node with the run's record validators, stopped on exit."""
    with ephemeral_identity() as identity:
        options = DHTOptions(
            initial_peers=config.initial_peers,
            listen=["/ip4/127.0.0.1/tcp/0"],
            identity=identity,
            client_mode=True,
            record_validators=validators(config.run_id, signing_key(identity)),
        )
        dht = start_dht(options)
    try:
        yield dht
    finally:
        stop_dht(dht)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f}"


def header(peers: List[PeerStatus], now: float) -> Text:
    """The swarm's totals over the peers that are not stale."""
    live = [p for p in peers if now - p.time <= STALE_AFTER]
    trainers = [p for p in live if p.role == "trainer"]
    tokens = sum(p.tokens_per_second for p in trainers)
    current = max((p.round for p in trainers), default=0)
    moved = sum(p.bytes_sent_total for p in peers)
    durations = [p.round_seconds for p in trainers if p.round_seconds > 0]
    per_round = f"{statistics.median(durations):.1f}s" if durations else "-"
    return Text.assemble(
        ("peers online ", "bold"), f"{len(live)}  ",
        ("tokens/s ", "bold"), f"{tokens:,.0f}  ",
        ("round ", "bold"), f"{current}  ",
        ("moved ", "bold"), f"{_megabytes(moved)} MB  ",
        ("per round ", "bold"), per_round,
    )  # fmt: skip


def render(peers: List[PeerStatus], now: float, title: str = "tapestry swarm") -> Group:
    """Header with totals, then one row per peer, sorted by partner; fits an 80-column terminal."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("partner", overflow="ellipsis", no_wrap=True, max_width=14)
    table.add_column("region", overflow="ellipsis", no_wrap=True, max_width=9)
    table.add_column("state", no_wrap=True, min_width=13)
    for numeric in ("round", "loss", "tok/s", "MB tx/rx", "grp", "s/rnd"):
        table.add_column(numeric, justify="right", no_wrap=True)
    for p in sorted(peers, key=lambda p: (p.partner, p.peer_id)):
        silent = now - p.time
        stale = silent > STALE_AFTER
        state = f"silent {silent:.0f}s" if stale else (p.role if p.role != "trainer" else p.state)
        table.add_row(
            p.partner,
            p.region,
            Text(state, style="dim" if stale else STATE_STYLES.get(p.state, "white")),
            str(p.round) if p.role == "trainer" else "-",
            f"{p.loss:.3f}" if p.loss is not None else "-",
            f"{p.tokens_per_second:,.0f}" if p.role == "trainer" else "-",
            f"{_megabytes(p.bytes_sent_total)}/{_megabytes(p.bytes_received_total)}",
            str(p.group_size) if p.role == "trainer" else "-",
            f"{p.round_seconds:.1f}" if p.round_seconds else "-",
            style="dim" if stale else None,
        )
    return Group(header(peers, now), table)


def snapshot_json(peers: List[PeerStatus]) -> str:
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


def run_live(dht: DHT, run_id: str, console: Console) -> None:
    """Refresh the table about once a second until Ctrl-C or `q`."""
    title = f"tapestry swarm '{run_id}' (q or Ctrl-C to quit)"
    with _keys_pressed() as quit_pressed, Live(console=console, auto_refresh=False, screen=False) as live:
        while not quit_pressed.is_set():
            live.update(render(read_statuses(dht, run_id), get_dht_time(), title), refresh=True)
            quit_pressed.wait(REFRESH_SECONDS)


def snapshot(dht: DHT, run_id: str, settle_seconds: float = 3.0) -> List[PeerStatus]:
    """One reading, retried for a few seconds while the DHT returns nothing (it may still be joining)."""
    deadline = time.monotonic() + settle_seconds
    peers = read_statuses(dht, run_id)
    while not peers and time.monotonic() < deadline:
        time.sleep(0.5)
        peers = read_statuses(dht, run_id)
    return peers
