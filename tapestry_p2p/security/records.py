"""DHT record validation: what every tapestry DHT node checks before it stores or returns a record.

Each record family (today: status records, see `telemetry.status`) declares a strict pydantic.v1 schema; every node
runs hivemind's RSASignatureValidator (a subkey in `[owner:...]` form must be signed by that owner's key) and a
`MemberRecords` (bounded lifetimes; in a consortium, owner-signed subkeys of members only) and a
SchemaValidator for the run's schemas (wrong types, out-of-range values and unknown fields are rejected at store time
and again when read).
"""

from __future__ import annotations

from typing import Any

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator

from tapestry_p2p.security.dht_auth import MemberRecords
from tapestry_p2p.security.membership import Members


def record_validators(key: Any, schema: Any, prefix: str, members: Members) -> list[Any]:
    """The validators of a DHT node that signs with `key` (an RSAPrivateKey) and accepts `schema`'s keys under
    `prefix` (the run id): signatures first, then lifetimes and membership (`dht_auth.MemberRecords`), then the
    schema."""
    return [RSASignatureValidator(key), MemberRecords(members), SchemaValidator(schema, prefix=prefix)]
