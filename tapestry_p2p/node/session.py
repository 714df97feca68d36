"""Being in a run's swarm: identity -> DHT node -> status record -> averager, started in that order and stopped in
reverse. Every kind of node uses it: a trainer (all four), `tapestry bootstrap` (no averager) and `tapestry monitor`
(a client-mode DHT only).

With a consortium file the session is members-only: our identity must be one of its nodes, the DHT signs and checks
every request (`security.dht_auth`), the averager refuses non-members (`comm.averager`), the peer table shows only
members under their consortium names, and `node.consortium_watch` installs newer quorum-signed versions in every
process of the node while it runs. Without one the swarm is open, and the session says so."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Optional

import torch

from tapestry_p2p.comm.averaging import AveragingConfig, SwarmAveraging
from tapestry_p2p.comm.error_feedback import ErrorFeedback
from tapestry_p2p.node.spec import decode, digest_of
from tapestry_p2p.p2p.addresses import DEFAULT_PEER_LISTEN
from tapestry_p2p.p2p.dht import DHT, DHTOptions, dht_time, start_dht, stop_dht, visible_maddrs
from tapestry_p2p.security.consortium import Consortium, ConsortiumError, names_of
from tapestry_p2p.security.consortium_watch import ConsortiumWatch
from tapestry_p2p.security.dht_auth import MemberAuthorizer, owner_subkey
from tapestry_p2p.security.identity import ephemeral_identity, load_or_create_identity, signing_key
from tapestry_p2p.security.membership import Members
from tapestry_p2p.telemetry.status import (
    PeerStatus,
    StatusPublisher,
    read_statuses,
    status_validators,
    swarm_ready,
    trainers_online,
)

logger = logging.getLogger(__name__)

WAIT_POLL_SECONDS = 1.0  # how often a node waiting for other trainers reads the peer table
SPEC_LIFETIME = 1800.0  # seconds a published run spec lives in the DHT (republished before; see Node)


def spec_key(run_id: str) -> str:
    return f"{run_id}_spec"


@dataclass
class SessionOptions:
    """Where and as whom to join. Multiaddrs are validated strings (p2p.addresses.parse_maddrs)."""

    run_id: str
    initial_peers: list[str] = field(default_factory=list)
    listen: list[str] = field(default_factory=lambda: list(DEFAULT_PEER_LISTEN))
    announce: list[str] = field(default_factory=list)
    identity: Optional[Path] = None  # None: a fresh identity, deleted when the session ends
    client_mode: bool = False  # a DHT client (the monitor): reads the swarm, is not reachable
    consortium: Optional[Consortium] = None  # None: an open swarm
    consortium_file: Optional[Path] = None  # where `consortium` was read from (watched for newer versions)


class SwarmSession:
    """A context manager: `with SwarmSession(options) as session:` is a running DHT node of the run."""

    averaging_class: type[SwarmAveraging] = SwarmAveraging

    def __init__(self, options: SessionOptions) -> None:
        self.options = options
        self._stack = contextlib.ExitStack()
        self.dht: DHT
        self.key: Any
        self.peer_id = ""
        self.status = StatusPublisher.disabled()
        self.consortium = options.consortium
        self.members = Members(names_of(options.consortium), options.consortium.version if options.consortium else 0)
        self.owner = b""  # our DHT subkey for owner-signed records
        self._averaging: Optional[SwarmAveraging] = None

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
        peer_id = load_or_create_identity(identity).to_base58()  # refuses a corrupt file or one readable by others
        if not self.members.allows(peer_id):
            raise ConsortiumError(
                f"this node ({peer_id}) is not in the consortium file: send the key `tapestry identity` prints to a "
                f"member, and start with the version that adds it"
            )
        self.key = signing_key(identity)
        self.owner = owner_subkey(self.key)
        dht_options = DHTOptions(
            initial_peers=options.initial_peers,
            listen=options.listen,
            announce=options.announce,
            identity=identity,
            client_mode=options.client_mode,
            record_validators=status_validators(options.run_id, self.key, self.members),
            authorizer=None if self.members.is_open else MemberAuthorizer(self.key, self.members),
        )
        self.dht = start_dht(dht_options)
        self._stack.callback(stop_dht, self.dht)
        self.peer_id = self.dht.peer_id.to_base58()
        if self.members.is_open and not options.client_mode:
            logger.warning(
                "open swarm: anyone who knows run id %r can join, send updates and read the model "
                "(pass --consortium FILE to admit members only)",
                options.run_id,
            )
        if self.consortium is not None:
            watch = ConsortiumWatch(
                self.dht, options.run_id, self.consortium, options.consortium_file, self.install_consortium
            )
            watch.start()
            self._stack.callback(watch.stop)

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
        config: AveragingConfig,
        state_fn: Callable[[], tuple[dict[str, Any], list[torch.Tensor]]],
        feedback: Optional[ErrorFeedback] = None,
    ) -> SwarmAveraging:
        """Start the run's averager (a child process), stopped before the status and DHT when the session ends. Only
        peers of the same run spec digest (`config.spec`) meet."""
        averaging = self.averaging_class(
            self.dht, self.options.run_id, self.owner, config, state_fn, self.members, feedback
        )
        self._stack.callback(averaging.shutdown)
        self._averaging = averaging
        return averaging

    def install_consortium(self, consortium: Consortium) -> None:
        """Admit the members of a newer consortium version in every process of this node (no restart)."""
        names = names_of(consortium)
        self.consortium = consortium
        self.members.replace(names, consortium.version)
        self.dht.run_coroutine(functools.partial(_replace_dht_members, names=names, version=consortium.version))
        if self._averaging is not None:
            self._averaging.replace_members(names, consortium.version)

    def peers(self) -> list[PeerStatus]:
        """The run's peer table, as the DHT has it now (validated records; in a consortium, members only, named as
        the consortium file names them)."""
        return read_statuses(self.dht, self.options.run_id, self.members)

    def others_online(self) -> bool:
        """Whether any other node (trainer or bootstrap) of the run reports in the peer table."""
        return any(p.peer_id != self.peer_id and p.state != "left" for p in self.peers())

    def publish_spec(self, encoded: bytes) -> None:
        """Store our run spec (canonical JSON) under its digest, so a peer of another spec can name the difference."""
        digest = digest_of(encoded)
        self.dht.store(spec_key(self.options.run_id), encoded, dht_time() + SPEC_LIFETIME, subkey=digest)

    def read_spec(self, digest: str) -> Optional[dict[str, Any]]:
        """The spec another peer published under `digest` (None if absent or not matching its digest)."""
        found = self.dht.get(spec_key(self.options.run_id), latest=True)
        if found is None or not isinstance(found.value, dict):
            return None
        entry = found.value.get(digest)
        return None if entry is None else decode(entry.value, digest)

    def wait_for_trainers(self, count: int, stop: threading.Event, spec: str) -> Optional[float]:
        """Wait until `count` trainers of the run spec digest `spec` (us included) are ready to train (their status
        records say since when: `PeerStatus.ready`, which the caller set on ours), or `stop` is set. Returns when the
        swarm became ready (`swarm_ready`: the same time on every peer that read the same records), None if
        stopped."""
        announced = False
        while not stop.is_set():
            peers = [p for p in self.peers() if p.spec == spec]
            ready = swarm_ready(peers, count)
            if ready is not None:
                return ready
            if not announced:
                logger.info("waiting for %d trainers to be ready (%d online so far)", count, trainers_online(peers))
                announced = True
            stop.wait(WAIT_POLL_SECONDS)
        return None


async def _replace_dht_members(_dht: DHT, node: Any, names: Optional[dict[str, str]], version: int) -> None:
    """In the DHT process: the authorizer and the record validator share one Members object."""
    node.protocol.authorizer.members.replace(names, version)
