"""Who may take part in a run: the member nodes of a consortium (peer id -> partner name), or anyone (open swarm).

`Members` is the live set a process checks every remote peer against: the averager's handlers and group assembly
(`comm.averager`), the DHT's request authorizer (`security.dht_auth`), the peer table and the state election. A
consortium update (`security.consortium`) replaces the set in place in every process of the node, without a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Optional


class Members:
    """A thread-safe set of admitted peer ids, each with its partner's name; `None` names mean an open swarm."""

    def __init__(self, names: Optional[Mapping[str, str]] = None, version: int = 0) -> None:
        self._lock = threading.Lock()
        self._names = None if names is None else dict(names)
        self.version = version

    @classmethod
    def open(cls) -> Members:
        return cls(None)

    @property
    def is_open(self) -> bool:
        return self._names is None

    def allows(self, peer_id: str) -> bool:
        with self._lock:
            return self._names is None or peer_id in self._names

    def name_of(self, peer_id: str) -> Optional[str]:
        """The partner a member node belongs to (None in an open swarm, or for a non-member)."""
        with self._lock:
            return None if self._names is None else self._names.get(peer_id)

    def partners(self) -> set[str]:
        with self._lock:
            return set() if self._names is None else set(self._names.values())

    def snapshot(self) -> Optional[dict[str, str]]:
        with self._lock:
            return None if self._names is None else dict(self._names)

    def replace(self, names: Optional[Mapping[str, str]], version: int) -> None:
        with self._lock:
            self._names = None if names is None else dict(names)
            self.version = version
