"""`tapestry bootstrap`: a DHT node with a persistent identity that only helps peers find each other.

Its lifecycle: validate the options (before anything is written to disk), create the identity if it is missing,
join the swarm (`node.session`), publish a `bootstrap` status record, write the address file, then wait for a stop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tapestry_p2p.errors import UserError
from tapestry_p2p.files import atomic_write
from tapestry_p2p.node.session import SessionOptions, SwarmSession
from tapestry_p2p.p2p.addresses import DEFAULT_BOOTSTRAP_LISTEN, check_ports_free, parse_maddrs
from tapestry_p2p.security.consortium import load as load_consortium
from tapestry_p2p.security.identity import load_or_create_identity

DEFAULT_IDENTITY = Path.home() / ".tapestry" / "bootstrap.key"
ALIVE_CHECK_SECONDS = 1.0


class BootstrapError(UserError):
    """The bootstrap node cannot start or stopped working; the message says what to do."""


@dataclass
class BootstrapOptions:
    run_id: str
    listen: list[str] = field(default_factory=lambda: list(DEFAULT_BOOTSTRAP_LISTEN))
    announce: list[str] = field(default_factory=list)
    identity: Path = DEFAULT_IDENTITY
    initial_peers: list[str] = field(default_factory=list)
    addr_file: Optional[Path] = None
    partner: str = "bootstrap"
    region: str = "unknown"
    consortium: Optional[Path] = None  # members only (the bootstrap's key must be one of its nodes); None: open


def run_bootstrap_node(
    options: BootstrapOptions, stop: threading.Event, announce: Callable[[str, list[str]], None]
) -> None:
    """Run until `stop` is set; `announce(peer_id, addresses)` is called once the node is reachable."""
    session_options = _validated(options)
    with SwarmSession(session_options) as session:
        session.publish_status(partner=options.partner, region=options.region, role="bootstrap")
        addresses = session.addresses()
        if options.addr_file is not None:
            text = "".join(a + "\n" for a in addresses)
            atomic_write(options.addr_file, lambda tmp: Path(tmp).write_text(text))
        announce(session.peer_id, addresses)
        while not stop.wait(ALIVE_CHECK_SECONDS):
            if not session.dht.is_alive():
                raise BootstrapError("the DHT process died; see the log above, then restart the bootstrap node")


def _validated(options: BootstrapOptions) -> SessionOptions:
    if options.addr_file is not None and not options.addr_file.parent.is_dir():
        raise BootstrapError(f"--addr-file: folder {options.addr_file.parent} does not exist; create it first")
    listen = parse_maddrs(options.listen, option="--listen", need_peer_id=False)
    check_ports_free(listen)  # before anything is written to disk
    session = SessionOptions(
        run_id=options.run_id,
        initial_peers=parse_maddrs(options.initial_peers, option="--initial-peers", need_peer_id=True),
        listen=listen,
        announce=parse_maddrs(options.announce, option="--announce", need_peer_id=False),
        identity=options.identity,
        consortium=None if options.consortium is None else load_consortium(options.consortium),
        consortium_file=options.consortium,
    )
    if session.consortium is not None and session.consortium.run_id != options.run_id:
        raise BootstrapError(
            f"{options.consortium} is the consortium of run {session.consortium.run_id!r}, not {options.run_id!r}"
        )
    if options.identity == DEFAULT_IDENTITY:
        options.identity.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    load_or_create_identity(options.identity)
    return session
