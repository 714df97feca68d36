"""DHT record validation: what every tapestry DHT node checks before it stores or returns a record.

Each record family (today: status records, see `telemetry.status`) declares a strict pydantic.v1 schema; every node
runs hivemind's RSASignatureValidator (a subkey in `[owner:...]` form must be signed by that owner's key) and a
`MemberRecords` (bounded lifetimes; in a consortium, owner-signed subkeys of members only) and a
SchemaValidator for the run's schemas (wrong types, out-of-range values and unknown fields are rejected at store time
and again when read).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Any

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.dht.validation import DHTRecord

from tapestry_p2p.security.dht_auth import MemberRecords
from tapestry_p2p.security.membership import Members

VERIFIED_RECORDS = 8192  # distinct signed records a DHT node remembers having verified


class VerifyingOnce(RSASignatureValidator):
    """hivemind's RSASignatureValidator, verifying each distinct record once per DHT node: a key with one signed
    subkey per partner (declarations, proposals, status records) comes back in every answer of every node a read
    asks, and RSA verification was a sixth of a DHT process's time with 16 partners on 2 cores. A record is its key,
    subkey, value (signature included) and expiration: an altered one is another record, verified afresh. Records are
    remembered by a SHA-256 digest of those four (32 bytes each, whatever the value's size)."""

    def __init__(self, private_key: Any = None) -> None:
        super().__init__(private_key)
        self._verified: OrderedDict[bytes, bool] = OrderedDict()

    def validate(self, record: DHTRecord) -> bool:
        digest = _digest(record)
        known = self._verified.get(digest)
        if known is not None:
            self._verified.move_to_end(digest)
            return known
        verdict = bool(super().validate(record))
        self._verified[digest] = verdict
        if len(self._verified) > VERIFIED_RECORDS:
            self._verified.popitem(last=False)
        return verdict


def _digest(record: DHTRecord) -> bytes:
    """SHA-256 of a record's key, subkey, value and expiration, each length-prefixed (no two records share one)."""
    h = hashlib.sha256()
    for field in (record.key, record.subkey, record.value, struct.pack("<d", record.expiration_time)):
        h.update(struct.pack("<Q", len(field)))
        h.update(field)
    return h.digest()


def record_validators(key: Any, schema: Any, prefix: str, members: Members) -> list[Any]:
    """The validators of a DHT node that signs with `key` (an RSAPrivateKey) and accepts `schema`'s keys under
    `prefix` (the run id): signatures first, then lifetimes and membership (`dht_auth.MemberRecords`), then the
    schema."""
    return [VerifyingOnce(key), MemberRecords(members), SchemaValidator(schema, prefix=prefix)]
