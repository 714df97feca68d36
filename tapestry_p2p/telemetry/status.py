"""Status records: what every node tells the swarm about itself, signed by its own key, schema-checked, in the DHT.

One DHT key per run (`<run_id>_status`), one subkey per peer: the subkey is the peer's RSA public key in hivemind's
`[owner:...]` form, so hivemind's RSASignatureValidator accepts a record only if that key signed it. A
SchemaValidator with strict pydantic models rejects wrong types, out-of-range values and unknown fields on every
honest DHT node, at store time and again when read. Records expire EXPIRY seconds after their last publication, so a
silent peer disappears on its own. hivemind serializes values with msgpack, so a record is ~400 bytes.

A node signs with the same RSA key that is its libp2p identity, so readers also check that the `peer_id` a record
claims is the one its signing key derives: a peer can only speak for itself.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pydantic.v1 as pydantic
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey
from hivemind.utils import get_dht_time

from tapestry_p2p import __version__
from tapestry_p2p.security.identity import peer_id_of
from tapestry_p2p.security.membership import Members
from tapestry_p2p.security.records import record_validators

logger = logging.getLogger(__name__)

PUBLISH_PERIOD = 3.0  # seconds between a node's status records
EXPIRY = 3 * PUBLISH_PERIOD + 1  # a record outlives its publication by this many seconds
STALE_AFTER = 2 * PUBLISH_PERIOD  # a peer silent for longer is shown greyed out until its record expires

Role = Literal["trainer", "bootstrap", "monitor"]
# "left": the last record of a node that stopped; it stays readable until it expires, and counts as nobody.
State = Literal["training", "averaging", "loading state", "idle", "left"]
_Name = pydantic.constr(strict=True, max_length=64)
_Count = pydantic.conint(strict=True, ge=0, le=2**62)
_PeerId = pydantic.constr(strict=True, min_length=1, max_length=128)
MAX_FLAGGED = 32  # peers a status record may name as refused or clipped
_Seconds = pydantic.confloat(strict=True, ge=0, le=1e9)


class PeerStatus(pydantic.BaseModel):
    """One peer's status record. Every field is required, strictly typed and bounded: it comes from strangers."""

    peer_id: _PeerId
    partner: _Name
    region: _Name
    role: Role
    state: State
    inner_step: _Count
    round: _Count
    loss: Optional[pydantic.confloat(strict=True, ge=0, le=1000)]
    tokens_per_second: pydantic.confloat(strict=True, ge=0, le=1e12)
    bytes_sent_round: _Count
    bytes_received_round: _Count
    bytes_sent_total: _Count
    bytes_received_total: _Count
    group_size: pydantic.conint(strict=True, ge=0, le=100_000)
    round_seconds: _Seconds
    compression: pydantic.constr(strict=True, max_length=16)
    spec: pydantic.constr(strict=True, max_length=16, regex=r"^[0-9a-f]*$")  # the run spec's digest ("" if none)
    version: pydantic.constr(strict=True, max_length=32)
    uptime: _Seconds
    last_failure: Optional[pydantic.constr(strict=True, max_length=200)]
    # groupmate peer id -> rounds in which this node refused (or left out) / clipped that groupmate's contribution
    refused: dict[_PeerId, _Count]
    clipped: dict[_PeerId, _Count]
    time: pydantic.confloat(strict=True, ge=0, le=1e11)  # unix seconds (DHT time) of publication
    # a trainer: when it was ready to train (joined, state caught up; swarm time, `comm.swarm_clock`), 0 before
    ready: pydantic.confloat(strict=True, ge=0, le=1e11)

    class Config:
        extra = pydantic.Extra.forbid

    @pydantic.validator("refused", "clipped")
    def _bounded(cls, value: dict[str, int]) -> dict[str, int]:  # noqa: N805 (pydantic's validator signature)
        if len(value) > MAX_FLAGGED:
            raise ValueError(f"at most {MAX_FLAGGED} peers")
        return value


class StatusSchema(pydantic.BaseModel):
    """The DHT schema: key `status` (prefixed with the run id) maps owner public keys to PeerStatus records."""

    status: dict[BytesWithPublicKey, PeerStatus]


def status_key(run_id: str) -> str:
    return f"{run_id}_status"


def status_validators(run_id: str, key: Any, members: Members) -> list[Any]:
    """The record validators every tapestry DHT node of a run runs (signatures, membership, the status schema)."""
    return record_validators(key, StatusSchema, prefix=run_id, members=members)


def parse_records(found: Any, members: Optional[Members] = None) -> list[PeerStatus]:
    """Validate what a DHT read returned (untrusted): drop malformed records and peers speaking for others; with
    `members` of a consortium, drop non-members and show each member under its consortium name."""
    if found is None or not isinstance(found.value, dict):
        return []
    peers = []
    for owner, entry in found.value.items():
        try:
            status = PeerStatus.parse_obj(entry.value)
        except (pydantic.ValidationError, TypeError, AttributeError):
            continue
        if not (isinstance(owner, bytes) and peer_id_of(owner) == status.peer_id):
            continue
        if members is not None and not members.is_open:
            name = members.name_of(status.peer_id)
            if name is None:
                continue
            status = status.copy(update={"partner": name})
        peers.append(status)
    return sorted(peers, key=lambda s: (s.partner, s.peer_id))


def read_statuses(dht: DHT, run_id: str, members: Optional[Members] = None) -> list[PeerStatus]:
    return parse_records(dht.get(status_key(run_id), latest=True), members)


def flags_against(peers: list[PeerStatus], peer_id: str) -> tuple[int, int]:
    """How many times the other peers refused and clipped `peer_id`'s contributions (from their records)."""
    others = [p for p in peers if p.peer_id != peer_id]
    return sum(p.refused.get(peer_id, 0) for p in others), sum(p.clipped.get(peer_id, 0) for p in others)


def trainers_online(peers: list[PeerStatus]) -> int:
    """Trainers whose last record does not say they left (a stopped node's record outlives it by up to EXPIRY)."""
    return sum(1 for p in peers if p.role == "trainer" and p.state != "left")


def swarm_ready(peers: list[PeerStatus], count: int) -> Optional[float]:
    """When the swarm became ready to train: the time the `count`-th trainer online was ready (the `count`-th
    smallest `ready`), or None while fewer are. Every peer that read the same records computes the same time; a
    member that lies about its own `ready` moves it at most to a neighbour's (it is one of `count`)."""
    ready = sorted(p.ready for p in peers if p.role == "trainer" and p.state != "left" and p.ready > 0)
    return ready[count - 1] if len(ready) >= count else None


PUBLISH_TIMEOUT = 10.0  # seconds a publication may take before it counts as failed (the DHT process may be gone)
PUBLISH_ERRORS = (OSError, EOFError, RuntimeError, TimeoutError)  # the DHT process is gone, slow or shutting down
WARN_AFTER_FAILURES = 5  # consecutive failed publications before the publisher warns (once)


@dataclass
class StatusPublisher:
    """Publishes this node's status every PUBLISH_PERIOD seconds from a background thread; `update` changes it.

    `update` validates the record it would publish, so a wrong field or value fails at the caller (pydantic's
    ValidationError), not later in the background thread.
    """

    dht: Optional[DHT]
    run_id: str
    key: Any  # the node's RSAPrivateKey (security.identity.signing_key); None when disabled
    fields: dict[str, Any]
    _started: float = field(default_factory=time.monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None

    def __post_init__(self) -> None:
        self._owner = RSASignatureValidator(self.key).local_public_key if self.key is not None else b""
        defaults: dict[str, Any] = dict(
            inner_step=0,
            round=0,
            loss=None,
            tokens_per_second=0.0,
            bytes_sent_round=0,
            bytes_received_round=0,
            bytes_sent_total=0,
            bytes_received_total=0,
            group_size=0,
            round_seconds=0.0,
            compression="-",
            spec="",
            version=__version__,
            last_failure=None,
            refused={},
            clipped={},
            state="idle",
            ready=0.0,
        )
        self.fields = {**defaults, **self.fields}
        self._build(self.fields)

    @classmethod
    def disabled(cls) -> StatusPublisher:
        """A publisher that validates and records updates and publishes nothing (a node with no network)."""
        identity = dict(peer_id="solo", partner="solo", region="unknown", role="trainer")
        return cls(dht=None, run_id="", key=None, fields=identity)

    def _build(self, values: dict[str, Any]) -> PeerStatus:
        return PeerStatus(**values, uptime=float(time.monotonic() - self._started), time=float(get_dht_time()))

    def update(self, **changes: Any) -> None:
        """Change fields of the record; raises pydantic's ValidationError (a ValueError) if the result is invalid."""
        with self._lock:
            values = {**self.fields, **changes}
            self._build(values)
            self.fields = values

    def publish_soon(self) -> None:
        """Publish the record now rather than at the next period (a change others wait for: `ready`)."""
        self._wake.set()

    def record(self) -> PeerStatus:
        with self._lock:
            return self._build(self.fields)

    def publish_once(self) -> bool:
        if self.dht is None:
            raise ValueError("a disabled StatusPublisher cannot publish")
        record = self.record()
        key = status_key(self.run_id)
        stored = self.dht.store(
            key, record.dict(), expiration_time=record.time + EXPIRY, subkey=self._owner, return_future=True
        )
        return bool(stored.result(timeout=PUBLISH_TIMEOUT))

    def start(self) -> None:
        if self.dht is None:
            raise ValueError("a disabled StatusPublisher cannot start")
        self._thread = threading.Thread(target=self._loop, name="status-publisher", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                stored = self.publish_once()
            except PUBLISH_ERRORS as e:
                logger.debug("status publish failed: %r", e)
                stored = False
            failures = 0 if stored else failures + 1
            if failures == WARN_AFTER_FAILURES:
                logger.warning("our status record was not stored %d times in a row; the monitor may miss us", failures)
            self._wake.wait(PUBLISH_PERIOD)
            self._wake.clear()

    def stop(self) -> None:
        """Stop publishing; the last record (state `left`) stays readable until it expires."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=PUBLISH_PERIOD + 5)
            self.update(state="left")
            try:
                self.publish_once()
            except PUBLISH_ERRORS as e:
                logger.debug("last status publish failed: %r", e)
