"""Keeping our run spec published, and saying once per peer when a trainer of our run trains another spec (it never
meets us: the spec digest is part of the averager's schema; one that has left is named too, since it is why we did
not meet it), from a background thread: the peer table is a DHT read,
which the training loop must not wait for."""

from __future__ import annotations

import json
import logging
import threading
import time

from tapestry_p2p.node.session import SwarmSession
from tapestry_p2p.node.spec import first_difference

logger = logging.getLogger(__name__)

WATCH_PERIOD = 10.0  # seconds between two looks at the peer table
SPEC_REPUBLISH = 600.0  # seconds between publications of our run spec (it lives node.session.SPEC_LIFETIME)
DHT_ERRORS = (OSError, EOFError, RuntimeError, TimeoutError)  # the DHT process is gone, slow or shutting down


class SpecWatch:
    """A background thread that republishes our spec and warns about peers training another one."""

    def __init__(self, session: SwarmSession, spec: bytes, digest: str) -> None:
        self.session, self.spec, self.digest = session, spec, digest
        self._published = -SPEC_REPUBLISH
        self._reported: set[str] = set()  # peers already told to be on another spec
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="spec-watch", daemon=True)

    def start(self) -> None:
        self.check_once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=WATCH_PERIOD + 10)

    def _loop(self) -> None:
        while not self._stop.wait(WATCH_PERIOD):
            try:
                self.check_once()
            except DHT_ERRORS as e:
                logger.debug("spec watch: DHT unavailable (%r)", e)

    def check_once(self) -> None:
        if time.monotonic() - self._published >= SPEC_REPUBLISH:
            self.session.publish_spec(self.spec)
            self._published = time.monotonic()
        for peer in self.session.peers():
            if peer.role != "trainer" or peer.spec in ("", self.digest):
                continue
            if peer.peer_id in self._reported:
                continue
            self._reported.add(peer.peer_id)
            theirs = self.session.read_spec(peer.spec)
            difference = first_difference(json.loads(self.spec), theirs) if theirs else "its spec is not readable"
            logger.warning(
                "partner %r (peer %s) trains run spec %s, we train %s (%s): it will not average with us; "
                "every partner must join with the same run.toml",
                peer.partner,
                peer.peer_id,
                peer.spec,
                self.digest,
                difference,
            )
