"""Node identities: the RSA key that is both a node's libp2p identity and the key that signs its DHT records.

An identity file holds a libp2p `PrivateKey` protobuf (RSA), mode 0600, written atomically. A node started without
`--identity` gets a fresh one in a private temporary folder (`ephemeral_identity`), so every tapestry node can sign.
`peer_id_of` derives the peer id a DHT subkey's owner key stands for, so a record can only speak for its signer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import multihash
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from tapestry_p2p.errors import UserError
from tapestry_p2p.files import atomic_write
from tapestry_p2p.p2p import hivemind_compat

logger = logging.getLogger(__name__)


class IdentityError(UserError):
    """An identity file that cannot be used; the message names the file and the fix."""


def load_or_create_identity(path: Path) -> PeerID:
    """Return the peer id stored at `path`, creating a new RSA identity there (mode 0600, atomically) if absent."""
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise IdentityError(f"identity file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
        try:
            return PeerID.from_identity(path.read_bytes())
        except Exception:  # noqa: BLE001 (protobuf and key parsing raise many types; all mean an unusable file)
            raise IdentityError(
                f"identity file {path} is corrupt; restore it from a backup, or delete it to get a new peer id"
            ) from None
    if not path.parent.is_dir():
        raise IdentityError(f"--identity: folder {path.parent} does not exist; create it first")
    _write_new_identity(path)
    logger.info("created a new identity in %s", path)
    return PeerID.from_identity(path.read_bytes())


def _write_new_identity(path: Path) -> None:
    """A new RSA libp2p identity at `path`, mode 0600, written atomically."""
    key = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes())
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(key.SerializeToString()))


@contextlib.contextmanager
def ephemeral_identity() -> Iterator[Path]:
    """A fresh RSA identity in a private temporary folder, removed on exit (for nodes started without --identity).

    Every tapestry node has an RSA identity, because the same key signs its status records (see telemetry).
    """
    folder = Path(tempfile.mkdtemp(prefix="tapestry-id-"))
    try:
        path = folder / "identity.key"
        _write_new_identity(path)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def signing_key(identity: Path) -> Any:
    """The RSA key of a libp2p identity file, as hivemind's signature validator wants it (an RSAPrivateKey)."""
    key = crypto_pb2.PrivateKey.FromString(identity.read_bytes())
    if key.key_type != crypto_pb2.KeyType.RSA:
        raise IdentityError(f"{identity} is not an RSA identity; delete it to get a new one")
    return hivemind_compat.rsa_key_from_der(key.data)


def peer_id_of(owner: bytes) -> str | None:
    """The libp2p peer id (base58) derived from a `[owner:ssh-rsa ...]` subkey, or None if it is not one."""
    found = hivemind_compat.owner_public_keys(owner)
    if len(found) != 1:
        return None
    return peer_id_of_key(found[0])


def peer_id_of_key(ssh_key: bytes) -> str | None:
    """The libp2p peer id (base58) of an RSA public key in OpenSSH format, or None if it is not one."""
    try:
        public = serialization.load_ssh_public_key(ssh_key.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(public, rsa.RSAPublicKey):
        return None
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def public_key_line(identity: Path) -> str:
    """The identity's public key in OpenSSH format: what a partner sends to be added to a consortium."""
    return signing_key(identity).get_public_key().to_bytes().decode()
