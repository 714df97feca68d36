"""Members-only DHT rules (security/dht_auth.py) without a network: record lifetimes, owner subkeys, tokens."""

from __future__ import annotations

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import get_dht_time

from tapestry_p2p.security.dht_auth import MAX_RECORD_LIFETIME, MemberAuthorizer, MemberRecords
from tapestry_p2p.security.identity import load_or_create_identity, signing_key
from tapestry_p2p.security.membership import Members


@pytest.fixture(scope="module")
def two_keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    keys = {}
    for name in ("member", "stranger"):
        path = folder / f"{name}.key"
        keys[name] = (load_or_create_identity(path).to_base58(), signing_key(path))
    return keys


def record(subkey: bytes, lifetime: float = 60.0) -> DHTRecord:
    return DHTRecord(b"run.meet.3", subkey, b"value", get_dht_time() + lifetime)


def test_records_live_at_most_an_hour_and_owner_subkeys_belong_to_members(two_keys):
    member_id = two_keys["member"][0]
    members = Members({member_id: "north"})
    rules = MemberRecords(members)
    owned_by = {name: RSASignatureValidator(key).local_public_key for name, (_, key) in two_keys.items()}
    assert rules.validate(record(owned_by["member"]))
    assert not rules.validate(record(owned_by["stranger"]))
    assert not rules.validate(record(owned_by["member"], lifetime=MAX_RECORD_LIFETIME + 60))  # R1/N4
    assert rules.validate(record(b"an unsigned subkey"))  # hivemind's own keys: only members can write (authorizer)
    assert MemberRecords(Members.open()).validate(record(owned_by["stranger"]))  # an open swarm: anyone
    assert not MemberRecords(Members.open()).validate(record(b"x", lifetime=10 * MAX_RECORD_LIFETIME))


def test_only_a_members_key_is_a_valid_token_and_membership_can_change(two_keys, caplog):
    member_id, member_key = two_keys["member"]
    stranger_id, stranger_key = two_keys["stranger"]
    members = Members({member_id: "north"})
    authorizer = MemberAuthorizer(member_key, members)
    member_token = AccessToken(public_key=member_key.get_public_key().to_bytes())
    stranger_token = AccessToken(public_key=stranger_key.get_public_key().to_bytes())
    assert authorizer.is_token_valid(member_token)
    assert not authorizer.is_token_valid(stranger_token)
    assert not authorizer.is_token_valid(AccessToken(public_key=b"ssh-rsa garbage"))
    assert f"refused DHT requests from {stranger_id}" in caplog.text
    members.replace({member_id: "north", stranger_id: "east"}, version=2)  # a consortium update
    assert authorizer.is_token_valid(stranger_token)


def test_a_signed_record_is_verified_once_and_an_altered_one_is_refused():
    from unittest import mock

    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

    from tapestry_p2p.security.records import VerifyingOnce

    validator = VerifyingOnce(RSAPrivateKey())
    unsigned = DHTRecord(b"key", validator.local_public_key, b"value", 1.0)
    signed = DHTRecord(b"key", validator.local_public_key, validator.sign_value(unsigned), 1.0)
    with mock.patch.object(RSAPublicKey, "verify", autospec=True, side_effect=RSAPublicKey.verify) as verify:
        assert validator.validate(signed) and validator.validate(signed)
    assert verify.call_count == 1  # (the second answer came from the cache)
    altered = DHTRecord(b"key", validator.local_public_key, signed.value.replace(b"value", b"forged"), 1.0)
    assert not validator.validate(altered)
