"""Status records in a real DHT: signatures, schema, peer binding, and the monitor's rendering."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from tapestry_p2p.p2p.dht import DHTOptions, start_dht, stop_dht, visible_maddrs
from tapestry_p2p.security.identity import ephemeral_identity, signing_key
from tapestry_p2p.security.membership import Members
from tapestry_p2p.telemetry.status import (
    EXPIRY,
    StatusPublisher,
    parse_records,
    read_statuses,
    status_key,
    status_validators,
)

RUN = "telemetry"


@pytest.fixture(scope="module")
def two_nodes():
    """Two DHT nodes with the run's validators, each with its own RSA identity (= signing key)."""
    nodes = []
    with ephemeral_identity() as id_a, ephemeral_identity() as id_b:
        for identity in (id_a, id_b):
            key = signing_key(identity)
            peers = visible_maddrs(nodes[0][0]) if nodes else []
            options = DHTOptions(
                initial_peers=peers,
                listen=["/ip4/127.0.0.1/tcp/0"],
                identity=identity,
                record_validators=status_validators(RUN, key, Members.open()),
            )
            nodes.append((start_dht(options), key))
    yield nodes
    for dht, _ in nodes:
        stop_dht(dht)


def publisher(dht, key, partner: str) -> StatusPublisher:
    fields = dict(peer_id=dht.peer_id.to_base58(), partner=partner, region="test", role="trainer")
    return StatusPublisher(dht, RUN, key, fields)


def store_raw(dht, owner: bytes, record: dict) -> bool:
    return bool(dht.store(status_key(RUN), record, expiration_time=get_dht_time() + EXPIRY, subkey=owner))


def test_a_peer_publishes_and_another_reads_it(two_nodes):
    (a, key_a), (b, _) = two_nodes
    status = publisher(a, key_a, "alpha")
    status.update(round=7, loss=1.5, state="averaging")
    assert status.publish_once()
    peers = read_statuses(b, RUN)
    mine = [p for p in peers if p.peer_id == a.peer_id.to_base58()]
    assert len(mine) == 1 and mine[0].round == 7 and mine[0].loss == 1.5 and mine[0].state == "averaging"


def test_a_record_for_another_peers_subkey_is_rejected(two_nodes):
    (a, key_a), (b, key_b) = two_nodes
    publisher(a, key_a, "alpha").publish_once()
    owner_a = RSASignatureValidator(key_a).local_public_key
    forged = publisher(a, key_a, "mallory").record().dict()  # claims to be A, stored by B
    assert not store_raw(b, owner_a, forged)
    assert {p.partner for p in read_statuses(a, RUN) if p.peer_id == a.peer_id.to_base58()} == {"alpha"}

    # the same record signed with B's key, as a malicious node would send it, fails A's key's check
    validator = RSASignatureValidator(key_a)
    record = DHTRecord(
        key=b"k", subkey=MSGPackSerializer.dumps(owner_a), value=MSGPackSerializer.dumps(forged), expiration_time=1e10
    )
    signed_by_b = (
        record.value + b"[signature:" + key_b.sign(MSGPackSerializer.dumps(dataclasses.astuple(record))) + b"]"
    )
    assert not validator.validate(dataclasses.replace(record, value=signed_by_b))
    signed_by_a = (
        record.value + b"[signature:" + key_a.sign(MSGPackSerializer.dumps(dataclasses.astuple(record))) + b"]"
    )
    assert validator.validate(dataclasses.replace(record, value=signed_by_a))


@pytest.mark.parametrize(
    "change",
    [
        {"round": -1},
        {"round": 3.0},
        {"loss": "low"},
        {"state": "dancing"},
        {"group_size": 10**9},
        {"extra": 1},
        {"partner": "x" * 65},
        {"tokens_per_second": 5},
    ],
)
def test_records_with_wrong_types_or_ranges_are_rejected(two_nodes, change):
    (a, key_a), _ = two_nodes
    good = publisher(a, key_a, "alpha").record().dict()
    bad = {**good, **change}
    assert not store_raw(a, RSASignatureValidator(key_a).local_public_key, bad)
    found = SimpleNamespace(value={RSASignatureValidator(key_a).local_public_key: SimpleNamespace(value=bad)})
    assert parse_records(found) == []
    good_found = SimpleNamespace(value={RSASignatureValidator(key_a).local_public_key: SimpleNamespace(value=good)})
    assert len(parse_records(good_found)) == 1


def test_a_peer_cannot_speak_for_another_peer_id(two_nodes):
    (a, key_a), (b, _) = two_nodes
    claim = publisher(a, key_a, "alpha").record().dict()
    claim["peer_id"] = b.peer_id.to_base58()  # signed by A, but claims B's identity
    assert store_raw(a, RSASignatureValidator(key_a).local_public_key, claim)  # well-formed and signed...
    assert all(p.peer_id != b.peer_id.to_base58() for p in read_statuses(a, RUN))  # ...yet not believed


def test_stopped_publisher_leaves_a_left_record(two_nodes):
    (a, key_a), (b, _) = two_nodes
    status_a = publisher(a, key_a, "alpha")
    status_a.start()
    status_a.update(round=9, state="training")
    time.sleep(0.5)
    status_a.stop()
    mine = [p for p in read_statuses(b, RUN) if p.peer_id == a.peer_id.to_base58()]
    assert mine and mine[0].state == "left" and mine[0].round == 9
