"""The consortium file and its rules (security/consortium.py), and the CLI that edits it; no network."""

from __future__ import annotations

import pytest
from helpers import assert_user_error, tapestry

from tapestry_p2p.security.consortium import (
    Consortium,
    ConsortiumError,
    check_genesis,
    check_successor,
    load,
    load_draft,
)
from tapestry_p2p.security.identity import load_or_create_identity, public_key_line, signing_key


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    paths = {name: folder / f"{name}.key" for name in ("a", "b", "c", "d")}
    for path in paths.values():
        load_or_create_identity(path)
    return paths


def founded(keys) -> Consortium:
    v1 = Consortium("run", 1).with_member("alpha", public_key_line(keys["a"]))
    v1 = v1.with_member("beta", public_key_line(keys["b"])).with_member("gamma", public_key_line(keys["c"]))
    return v1.signed_by(signing_key(keys["a"])).signed_by(signing_key(keys["b"]))


def test_version_one_needs_a_majority_of_its_own_partners(keys):
    v1 = founded(keys)
    check_genesis(v1, "f")  # 2 of 3
    one = Consortium("run", 1, v1.members).signed_by(signing_key(keys["c"]))
    with pytest.raises(ConsortiumError, match="signed by 1 of its 3 partners, it needs 2"):
        check_genesis(one, "f")


def test_a_successor_needs_a_majority_of_the_current_partners(keys):
    v1 = founded(keys)
    v2 = v1.with_member("delta", public_key_line(keys["d"]))
    assert (v2.version, v2.previous, v2.genesis, dict(v2.signatures)) == (2, v1.digest(), v1.digest(), {})
    with pytest.raises(ConsortiumError, match="signed by 1 of the 3 partners of version 1; it needs 2"):
        check_successor(v1, v2.signed_by(signing_key(keys["d"])).signed_by(signing_key(keys["a"])))
    check_successor(v1, v2.signed_by(signing_key(keys["a"])).signed_by(signing_key(keys["c"])))
    assert v2.consortium_id == v1.consortium_id  # checkpoints keep matching across versions


def test_a_tampered_or_unchained_version_is_refused(keys):
    v1 = founded(keys)
    v2 = v1.with_member("delta", public_key_line(keys["d"]))
    signed = v2.signed_by(signing_key(keys["a"])).signed_by(signing_key(keys["b"]))
    tampered = Consortium(signed.run_id, 2, signed.members[:3], signed.genesis, signed.previous, signed.signatures)
    with pytest.raises(ConsortiumError, match="signed by 0"):  # the signatures are over another body
        check_successor(v1, tampered)
    skipped = Consortium("run", 3, signed.members, signed.genesis, signed.previous, {})
    with pytest.raises(ConsortiumError, match="does not follow version 1"):
        check_successor(v1, skipped)
    other_run = Consortium("other", 2, signed.members, signed.genesis, signed.previous, signed.signatures)
    with pytest.raises(ConsortiumError, match="another consortium or run"):
        check_successor(v1, other_run)


def test_names_come_from_the_file_and_a_peer_id_from_its_key(keys):
    names = founded(keys).node_names()
    expected = load_or_create_identity(keys["a"]).to_base58()
    assert names[expected] == "alpha" and set(names.values()) == {"alpha", "beta", "gamma"}


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("run_id = 'r'\nversion = 0\n", "positive integer"),
        ("run_id = 'r'\nversion = 2\n", "names its genesis"),
        ("not toml [", "not valid TOML"),
        ('run_id = "r"\nversion = 1\n[[members]]\nname = "a\\u0007"\nnodes = []\n', "no control characters"),
    ],
)
def test_a_malformed_file_is_refused_with_one_line(tmp_path, text, fragment):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConsortiumError, match=fragment):
        load_draft(path)


def test_the_cli_creates_adds_signs_and_verifies(tmp_path, keys):
    path = tmp_path / "consortium.toml"
    assert tapestry("consortium", "create", str(path), "--run-id", "run").returncode == 0
    for name, key in (("alpha", "a"), ("beta", "b")):
        result = tapestry("consortium", "add", str(path), "--partner", name, "--node", public_key_line(keys[key]))
        assert result.returncode == 0, result.stderr
    assert_user_error(tapestry("consortium", "verify", str(path)), "signed by 0 of its 2 partners, it needs 2")
    for key in ("a", "b"):
        assert tapestry("consortium", "sign", str(path), "--identity", str(keys[key])).returncode == 0
    verified = tapestry("consortium", "verify", str(path))
    assert verified.returncode == 0 and "version 1, valid" in verified.stdout
    assert load(path).version == 1
    before = path.read_text()
    assert_user_error(
        tapestry("consortium", "add", str(path), "--partner", "x", "--node", "ssh-rsa AAAA-not-a-key"),
        "--node must be an RSA public key",
    )
    assert path.read_text() == before  # nothing half-written
    identity = tapestry("identity", "--identity", str(keys["c"]))
    assert identity.returncode == 0 and public_key_line(keys["c"]) in identity.stdout.replace("\n", "")


def test_a_node_not_in_the_file_is_refused_at_start(tmp_path, keys):
    path = tmp_path / "consortium.toml"
    from tapestry_p2p.security.consortium import save

    save(founded(keys), path)
    data = tmp_path / "data.txt"
    data.write_text("some text to train on " * 100)
    result = tapestry(
        "join", "--data", str(data), "--consortium", str(path), "--identity", str(keys["d"]), "--run-id", "run"
    )
    assert_user_error(result, "is not in the consortium file")
    assert_user_error(tapestry("join", "--data", str(data), "--consortium", str(path)), "needs its persistent identity")


def test_a_pinned_run_spec_is_a_signed_successor_and_survives_the_file(keys, tmp_path):
    v1 = founded(keys)
    digest_before = Consortium.from_toml(v1.to_toml(), "f").digest()
    assert digest_before == v1.digest()  # no pin: the body (and every existing digest) is as before pins existed
    v2 = v1.with_spec("0123456789abcdef")
    assert (v2.version, v2.spec, v2.previous) == (2, "0123456789abcdef", v1.digest())
    signed = v2.signed_by(signing_key(keys["a"])).signed_by(signing_key(keys["b"]))
    check_successor(v1, signed)
    assert Consortium.from_toml(signed.to_toml(), "f") == signed
    tampered = Consortium.from_toml(signed.to_toml().replace("0123456789abcdef", "fedcba9876543210"), "f")
    with pytest.raises(ConsortiumError, match="signed by 0 of the 3 partners"):
        check_successor(v1, tampered)
    with pytest.raises(ConsortiumError, match="16 hex digits"):
        v1.with_spec("not-a-digest")
    path = tmp_path / "c.toml"
    path.write_text(v1.to_toml())
    assert tapestry("consortium", "pin-spec", str(path), "--digest", "0123456789abcdef").returncode == 0
    assert load_draft(path).spec == "0123456789abcdef" and load_draft(path).version == 2
