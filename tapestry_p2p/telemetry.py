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

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import multihash
import pydantic.v1 as pydantic
from cryptography.hazmat.primitives import serialization
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from tapestry_p2p import __version__

logger = logging.getLogger(__name__)

PUBLISH_PERIOD = 3.0  # seconds between a node's status records
EXPIRY = 3 * PUBLISH_PERIOD + 1  # a record outlives its publication by this many seconds
STALE_AFTER = 2 * PUBLISH_PERIOD  # a peer silent for longer is shown greyed out until its record expires

Role = Literal["trainer", "bootstrap", "monitor"]
State = Literal["training", "averaging", "loading state", "idle"]
_Name = pydantic.constr(strict=True, max_length=64)
_Count = pydantic.conint(strict=True, ge=0, le=2**62)
_Seconds = pydantic.confloat(strict=True, ge=0, le=1e9)


class PeerStatus(pydantic.BaseModel):
    """One peer's status record. Every field is required, strictly typed and bounded: it comes from strangers."""

    peer_id: pydantic.constr(strict=True, min_length=1, max_length=128)
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
    version: pydantic.constr(strict=True, max_length=32)
    uptime: _Seconds
    last_failure: Optional[pydantic.constr(strict=True, max_length=200)]
    time: pydantic.confloat(strict=True, ge=0, le=1e11)  # unix seconds (DHT time) of publication

    class Config:
        extra = pydantic.Extra.forbid


class StatusSchema(pydantic.BaseModel):
    """The DHT schema: key `status` (prefixed with the run id) maps owner public keys to PeerStatus records."""

    status: Dict[BytesWithPublicKey, PeerStatus]


def status_key(run_id: str) -> str:
    return f"{run_id}_status"


def signing_key(identity: Path) -> RSAPrivateKey:
    """The RSA key of a libp2p identity file, as hivemind's signature validator wants it."""
    key = crypto_pb2.PrivateKey.FromString(identity.read_bytes())
    if key.key_type != crypto_pb2.KeyType.RSA:
        raise ValueError(f"{identity} is not an RSA identity; delete it to get a new one")
    private = RSAPrivateKey.__new__(RSAPrivateKey)
    private.__setstate__({"_private_key": key.data})  # hivemind's own unpickling path: DER bytes -> key
    return private


def validators(run_id: str, key: RSAPrivateKey) -> list:
    """The record validators every tapestry DHT node runs: signatures first, then the schema."""
    return [RSASignatureValidator(key), SchemaValidator(StatusSchema, prefix=run_id)]


def peer_id_of(owner: bytes) -> Optional[str]:
    """The libp2p peer id (base58) derived from a `[owner:ssh-rsa ...]` subkey, or None if it is not one."""
    found = RSASignatureValidator._PUBLIC_KEY_RE.findall(owner)
    if len(found) != 1:
        return None
    try:
        public = serialization.load_ssh_public_key(found[0])
    except (ValueError, TypeError):
        return None
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def parse_records(found: Any) -> List[PeerStatus]:
    """Validate what a DHT read returned (untrusted): drop malformed records and peers speaking for others."""
    if found is None or not isinstance(found.value, dict):
        return []
    peers = []
    for owner, entry in found.value.items():
        try:
            status = PeerStatus.parse_obj(entry.value)
        except (pydantic.ValidationError, TypeError, AttributeError):
            continue
        if isinstance(owner, bytes) and peer_id_of(owner) == status.peer_id:
            peers.append(status)
    return sorted(peers, key=lambda s: (s.partner, s.peer_id))


def read_statuses(dht: DHT, run_id: str) -> List[PeerStatus]:
    return parse_records(dht.get(status_key(run_id), latest=True))


@dataclass
class StatusPublisher:
    """Publishes this node's status every PUBLISH_PERIOD seconds from a background thread; `update` changes it."""

    dht: Optional[DHT]
    run_id: str
    key: Optional[RSAPrivateKey]
    fields: Dict[str, Any]
    _started: float = field(default_factory=time.monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: Optional[threading.Thread] = None

    def __post_init__(self) -> None:
        self._owner = RSASignatureValidator(self.key).local_public_key if self.key is not None else b""
        defaults = dict(
            inner_step=0, round=0, loss=None, tokens_per_second=0.0, bytes_sent_round=0, bytes_received_round=0,
            bytes_sent_total=0, bytes_received_total=0, group_size=0, round_seconds=0.0, compression="-",
            version=__version__, last_failure=None, state="idle",
        )  # fmt: skip
        self.fields = {**defaults, **self.fields}

    @classmethod
    def disabled(cls) -> "StatusPublisher":
        """A publisher that records updates and publishes nothing (a node with no network)."""
        return cls(dht=None, run_id="", key=None, fields={})

    def update(self, **changes: Any) -> None:
        with self._lock:
            self.fields.update(changes)

    def record(self) -> PeerStatus:
        with self._lock:
            values = dict(self.fields)
        return PeerStatus(**values, uptime=float(time.monotonic() - self._started), time=float(get_dht_time()))

    def publish_once(self) -> bool:
        record = self.record()
        return bool(
            self.dht.store(
                status_key(self.run_id), record.dict(), expiration_time=record.time + EXPIRY, subkey=self._owner
            )
        )

    def start(self) -> None:
        if self.dht is None:
            raise ValueError("a disabled StatusPublisher cannot start")
        self._thread = threading.Thread(target=self._loop, name="status-publisher", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.publish_once():
                    logger.debug("status record was not stored")
            except Exception as e:  # the DHT may be shutting down; the next period tries again
                logger.debug("status publish failed: %r", e)
            self._stop.wait(PUBLISH_PERIOD)

    def stop(self) -> None:
        """Stop publishing; the last record (state idle) stays readable until it expires."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=PUBLISH_PERIOD + 5)
            self.update(state="idle")
            try:
                self.publish_once()
            except Exception as e:
                logger.debug("last status publish failed: %r", e)
