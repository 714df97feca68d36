"""Members-only DHT: every DHT request and response is signed by its node's identity key, and only member nodes'
keys are accepted (hivemind's authorizer protocol, `TokenAuthorizerBase`); every record a node stores or returns has a
bounded lifetime, and an owner-signed subkey must belong to a member.

hivemind's authorizer covers the DHT's RPCs (ping, store, find) only; the averager's own RPCs check membership on
libp2p's authenticated remote peer id instead (`comm.averager`). The access token is the node's own public key: the
peer id derived from it must be in the member list (`security.membership.Members`), and each request is signed with
the matching private key, with a nonce and a time (hivemind rejects replays and clocks more than a minute apart).
"""

from __future__ import annotations

import logging
import time

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import get_dht_time
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey

from tapestry_p2p.security.identity import peer_id_of, peer_id_of_key
from tapestry_p2p.security.membership import Members

logger = logging.getLogger(__name__)

MAX_RECORD_LIFETIME = 3600.0  # seconds: a record that claims to live longer is refused (N4/M1 in the review)
REFUSAL_LOG_PERIOD = 60.0  # log a refused peer at most this often


class MemberAuthorizer(TokenAuthorizerBase):
    """Signs our DHT requests and responses with our identity key; accepts only members' (see module docstring)."""

    def __init__(self, key: RSAPrivateKey, members: Members) -> None:
        super().__init__(key)
        self.members = members
        self._last_refusal: dict[str, float] = {}

    async def get_token(self) -> AccessToken:
        public = self.local_public_key.to_bytes()
        return AccessToken(username=peer_id_of_key(public) or "", public_key=public, expiration_time="never")

    def is_token_valid(self, access_token: AccessToken) -> bool:
        peer = peer_id_of_key(access_token.public_key)
        if peer is not None and self.members.allows(peer):
            return True
        who = peer or "a peer that sent no valid key"
        if time.monotonic() - self._last_refusal.get(who, -REFUSAL_LOG_PERIOD) >= REFUSAL_LOG_PERIOD:
            self._last_refusal[who] = time.monotonic()
            logger.warning("refused DHT requests from %s: not a member of the consortium", who)
        return False

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False


class MemberRecords(RecordValidatorBase):
    """Refuses records that live longer than MAX_RECORD_LIFETIME, and owner-signed subkeys of non-members."""

    def __init__(self, members: Members) -> None:
        self.members = members

    def validate(self, record: DHTRecord) -> bool:
        if record.expiration_time > get_dht_time() + MAX_RECORD_LIFETIME:
            return False
        if self.members.is_open:
            return True
        for part in (record.key, record.subkey):
            if b"[owner:" in part:
                peer = peer_id_of(part)
                if peer is None or not self.members.allows(peer):
                    return False
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value

    @property
    def priority(self) -> int:
        return 5  # after the signature check (RSASignatureValidator's priority is 10: higher runs first)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, MemberRecords)


def owner_subkey(key: RSAPrivateKey) -> bytes:
    """The DHT subkey that makes a record ours: hivemind signs it and every node checks the signature."""
    return RSASignatureValidator(key).local_public_key
