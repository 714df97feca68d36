"""Membership changes without a restart: a running node adopts a newer consortium version, from its own file or from
any peer, when a majority of the current version's partners signed it (`security.consortium.check_successor`).

Every WATCH_PERIOD seconds the watch:
- re-reads the node's consortium file if it changed (an operator put a new version there);
- reads the run's consortium record in the DHT (`<run>_consortium`, one subkey per version, the file's text) and
  walks forward version by version;
- re-publishes the newest version it holds every PUBLISH_PERIOD seconds, so a version spreads from any one node to all.

A valid successor is installed in every process of the node (`install`, which the session gives:
`node.session.SwarmSession.install_consortium`); anything else is refused with one log line naming the version and
why, and changes nothing. The watch knows the DHT, the run and the install step, nothing of the session itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from tapestry_p2p.p2p.dht import DHT, dht_time
from tapestry_p2p.security.consortium import MAX_FILE_BYTES, Consortium, ConsortiumError, check_successor
from tapestry_p2p.security.dht_auth import MAX_RECORD_LIFETIME

logger = logging.getLogger(__name__)

WATCH_PERIOD = 2.0  # seconds between two looks at the file and the DHT
PUBLISH_PERIOD = 30.0  # seconds between two publications of our newest version
DHT_ERRORS = (OSError, EOFError, RuntimeError, TimeoutError)  # the DHT process is gone, slow or shutting down


def consortium_key(run_id: str) -> str:
    return f"{run_id}_consortium"


class ConsortiumWatch:
    """A background thread that keeps a node's consortium at the newest valid version it can find."""

    def __init__(
        self,
        dht: DHT,
        run_id: str,
        current: Consortium,
        path: Optional[Path],
        install: Callable[[Consortium], None],
    ) -> None:
        """`path`: the node's consortium file (watched for a newer version); `install`: admits a new version's members
        in every process of the node."""
        self.dht, self.run_id, self.current, self.path, self.install = dht, run_id, current, path, install
        self._file_seen = self._file_signature()
        self._refused: set[str] = set()  # digests already refused (logged once)
        self._published = -float("inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="consortium-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=WATCH_PERIOD + 10)

    def _loop(self) -> None:
        while not self._stop.wait(WATCH_PERIOD):
            try:
                self.check_once()
            except DHT_ERRORS as e:
                logger.debug("consortium watch: DHT unavailable (%r)", e)

    def check_once(self) -> None:
        self._check_file()
        self._check_dht()
        if time.monotonic() - self._published >= PUBLISH_PERIOD:
            self._publish()

    # ---- sources ----

    def _file_signature(self) -> Optional[tuple[float, int]]:
        try:
            return None if self.path is None else (self.path.stat().st_mtime, self.path.stat().st_size)
        except OSError:
            return None

    def _check_file(self) -> None:
        signature = self._file_signature()
        if signature is None or signature == self._file_seen or self.path is None:
            return
        self._file_seen = signature
        try:
            text = self.path.read_text()
        except OSError as e:
            logger.warning("could not read consortium file %s (%s)", self.path, e.strerror)
            return
        self.offer(text, f"file {self.path}")

    def _check_dht(self) -> None:
        found = self.dht.get(consortium_key(self.run_id), latest=True)
        if found is None or not isinstance(found.value, dict):
            return
        by_version = {}
        for subkey, entry in found.value.items():
            value = getattr(entry, "value", None)
            if type(subkey) is int and isinstance(value, str) and len(value) <= MAX_FILE_BYTES:
                by_version[subkey] = value
        while self.current.version + 1 in by_version:
            if not self.offer(by_version[self.current.version + 1], "the swarm"):
                return

    def _publish(self) -> None:
        self._published = time.monotonic()
        now = dht_time()
        self.dht.store(
            consortium_key(self.run_id),
            self.current.to_toml(),
            expiration_time=now + MAX_RECORD_LIFETIME - 60,
            subkey=self.current.version,
        )

    # ---- adopting ----

    def offer(self, text: str, source: str) -> bool:
        """Adopt `text` if it is the valid next version; returns whether we did (refusals are logged once)."""
        try:
            new = Consortium.from_toml(text, source)
        except ConsortiumError as e:
            self._refuse(text, f"refused a consortium version from {source}: {e}")
            return False
        if new.version <= self.current.version:
            return False
        try:
            check_successor(self.current, new)
        except ConsortiumError as e:
            self._refuse(new.digest(), f"refused consortium version {new.version} from {source}: {e}")
            return False
        self.install(new)
        self.current = new
        self._published = -float("inf")  # spread it now
        logger.warning(
            "adopted consortium version %d from %s: partners %s",
            new.version,
            source,
            ", ".join(sorted(m.name for m in new.members)),
        )
        return True

    def _refuse(self, key: Any, message: str) -> None:
        key = str(hash(key))
        if key not in self._refused:
            self._refused.add(key)
            logger.warning("%s", message)
