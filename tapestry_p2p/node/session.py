"""Being in a run's swarm: identity -> DHT node -> status record -> averager, started in that order and stopped in
reverse. Every kind of node uses it: a trainer (all four), `tapestry bootstrap` (no averager) and `tapestry monitor`
(a client-mode DHT only, with a throwaway identity)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Optional

import torch

from tapestry_p2p.comm.averager import FaultHook
from tapestry_p2p.comm.averaging import SwarmAveraging
from tapestry_p2p.p2p.addresses import DEFAULT_PEER_LISTEN
from tapestry_p2p.p2p.dht import DHT, DHTOptions, start_dht, stop_dht, visible_maddrs
from tapestry_p2p.security.identity import ephemeral_identity, load_or_create_identity, signing_key
from tapestry_p2p.telemetry.status import (
    PeerStatus,
    StatusPublisher,
    read_statuses,
    status_validators,
    trainers_online,
)

logger = logging.getLogger(__name__)

WAIT_POLL_SECONDS = 1.0  # how often a node waiting for other trainers reads the peer table


@dataclass
class SessionOptions:
    """Where and as whom to join. Multiaddrs are validated strings (p2p.addresses.parse_maddrs)."""

    run_id: str
    initial_peers: list[str] = field(default_factory=list)
    listen: list[str] = field(default_factory=lambda: list(DEFAULT_PEER_LISTEN))
    announce: list[str] = field(default_factory=list)
    identity: Optional[Path] = None  # None: a fresh identity, deleted when the session ends
    client_mode: bool = False  # a DHT client (the monitor): reads the swarm, is not reachable


class SwarmSession:
    """A context manager: `with SwarmSession(options) as session:` is a running DHT node of the run."""

    def __init__(self, options: SessionOptions) -> None:
        self.options = options
        self._stack = contextlib.ExitStack()
        self.dht: DHT
        self.key: Any
        self.peer_id = ""
        self.status = StatusPublisher.disabled()

    def __enter__(self) -> SwarmSession:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start(self) -> None:
        options = self.options
        identity = options.identity or self._stack.enter_context(ephemeral_identity())
        load_or_create_identity(identity)  # creates a missing file; refuses a corrupt one or one readable by others
        self.key = signing_key(identity)
        dht_options = DHTOptions(
            initial_peers=options.initial_peers,
            listen=options.listen,
            announce=options.announce,
            identity=identity,
            client_mode=options.client_mode,
            record_validators=status_validators(options.run_id, self.key),
        )
        self.dht = start_dht(dht_options)
        self._stack.callback(stop_dht, self.dht)
        self.peer_id = self.dht.peer_id.to_base58()

    def __exit__(
        self, kind: Optional[type[BaseException]], error: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self._stack.close()

    def addresses(self) -> list[str]:
        """Our dialable multiaddrs, each ending in /p2p/<peer id>."""
        return visible_maddrs(self.dht)

    def publish_status(self, **fields: Any) -> StatusPublisher:
        """Start publishing our status record (`PeerStatus` fields); it says `left` when the session ends."""
        self.status = StatusPublisher(self.dht, self.options.run_id, self.key, dict(peer_id=self.peer_id, **fields))
        self.status.start()
        self._stack.callback(self.status.stop)
        return self.status

    def averaging(
        self,
        shapes: Sequence[torch.Size],
        compression: str,
        state_fn: Callable[[], tuple[dict[str, Any], list[torch.Tensor]]],
        fault: Optional[FaultHook] = None,
    ) -> SwarmAveraging:
        """Start the run's averager (a child process), stopped before the status and DHT when the session ends."""
        averaging = SwarmAveraging(self.dht, self.options.run_id, shapes, compression, state_fn, fault)
        self._stack.callback(averaging.shutdown)
        return averaging

    def peers(self) -> list[PeerStatus]:
        """The run's peer table, as the DHT has it now (validated records)."""
        return read_statuses(self.dht, self.options.run_id)

    def others_online(self) -> bool:
        """Whether any other node (trainer or bootstrap) of the run reports in the peer table."""
        return any(p.peer_id != self.peer_id and p.state != "left" for p in self.peers())

    def wait_for_trainers(self, count: int, stop: threading.Event) -> None:
        """Wait until `count` trainers of the run (us included) report in the peer table, or `stop` is set."""
        announced = False
        while not stop.is_set():
            online = trainers_online(self.peers())
            if online >= count:
                return
            if not announced:
                logger.info("waiting for %d trainers to come online (%d so far)", count, online)
                announced = True
            stop.wait(WAIT_POLL_SECONDS)
