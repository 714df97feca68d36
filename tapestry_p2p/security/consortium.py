"""The consortium file: who trains in a run, signed by its members; no server, no chain.

A TOML file names the run, its member partners and each partner's nodes (their identities' RSA public keys, from
which their peer ids derive), and carries a version and members' signatures:

    run_id = "tapestry"
    version = 2
    genesis = "9f2c..."      # digest of version 1 (absent in version 1): the consortium's id, for checkpoints
    previous = "51ab..."     # digest of the version this one replaces (absent in version 1)
    spec = "3b21ed6f..."     # optional: the digest of the run spec every member trains (`tapestry spec show`)

    [[members]]
    name = "north-lab"
    nodes = ["ssh-rsa AAAA..."]

    [[signatures]]
    node = "Qm..."           # peer id of a member node that signed
    signature = "..."        # base64 RSA signature of the version's body

The body is every field but the signatures, serialized canonically (sorted-key JSON); its SHA-256 is the version's
digest. Rules (`check_genesis`, `check_successor`):
- version 1 is trusted because the operator installed it, and must be signed by a majority of its own partners;
- version v+1 is accepted only with the same run and genesis, `previous` equal to v's digest, and signatures of a
  strict majority of v's partners (a partner counts once, whichever of its nodes signs). So a minority cannot add or
  remove anyone, and a node that holds v accepts v+1 from any peer (it spreads through the DHT,
  `node.consortium_watch`).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import tomli_w
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from tapestry_p2p.errors import UserError
from tapestry_p2p.files import atomic_write
from tapestry_p2p.security.identity import peer_id_of_key

NAME_RULE = "1-64 characters, no control characters"
MAX_FILE_BYTES = 1 << 20  # a consortium file (or a DHT record of one) larger than this is refused unread
MAX_MEMBERS = 1000


class ConsortiumError(UserError):
    """A consortium file that cannot be used, or a version that does not follow from the one we hold."""


@dataclass(frozen=True)
class Member:
    name: str  # the partner's name, shown in every peer table
    nodes: tuple[str, ...]  # its nodes' RSA public keys, OpenSSH format ("ssh-rsa AAAA...")


@dataclass(frozen=True)
class Consortium:
    run_id: str
    version: int
    members: tuple[Member, ...] = ()
    genesis: str = ""  # digest of version 1 ("" in version 1 itself)
    previous: str = ""  # digest of the version this one replaces ("" in version 1)
    signatures: Mapping[str, str] = field(default_factory=dict)  # signer peer id -> base64 signature
    spec: str = ""  # the run spec digest members must train ("": not pinned)

    # ---- identity of a version ----

    def body(self) -> bytes:
        """What members sign: everything but the signatures, canonically serialized."""
        data = {
            "run_id": self.run_id,
            "version": self.version,
            "genesis": self.genesis,
            "previous": self.previous,
            "members": [{"name": m.name, "nodes": list(m.nodes)} for m in self.members],
        }
        if self.spec:  # only when pinned, so versions written before pins existed keep their digests
            data["spec"] = self.spec
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.body()).hexdigest()

    @property
    def consortium_id(self) -> str:
        """The same for every version of one consortium: version 1's digest."""
        return self.genesis or self.digest()

    def node_names(self) -> dict[str, str]:
        """Peer id -> partner name, for every member node."""
        names = {}
        for member in self.members:
            for key in member.nodes:
                peer = peer_id_of_key(key.encode())
                if peer is not None:
                    names[peer] = member.name
        return names

    def node_keys(self) -> dict[str, str]:
        """Peer id -> public key, for every member node."""
        keys = {}
        for member in self.members:
            for key in member.nodes:
                peer = peer_id_of_key(key.encode())
                if peer is not None:
                    keys[peer] = key
        return keys

    # ---- signatures ----

    def signed_by(self, key: RSAPrivateKey) -> Consortium:
        """This version with `key`'s signature added (or replaced)."""
        public = key.get_public_key().to_bytes()
        signer = peer_id_of_key(public)
        if signer is None:
            raise ConsortiumError("this identity's key is not an RSA key; create one with `tapestry identity`")
        signature = key.sign(self.body()).decode()
        return replace(self, signatures={**self.signatures, signer: signature})

    def partners_signing(self, electorate: Consortium) -> set[str]:
        """The partners of `electorate` whose nodes validly signed this version."""
        keys, names = electorate.node_keys(), electorate.node_names()
        body, partners = self.body(), set()
        for signer, signature in self.signatures.items():
            key = keys.get(signer)
            if key is None:
                continue
            try:
                valid = RSAPublicKey.from_bytes(key.encode()).verify(body, signature.encode())
            except ValueError:
                valid = False
            if valid:
                partners.add(names[signer])
        return partners

    def quorum(self) -> int:
        """Signatures of this many of its partners make a successor valid: a strict majority."""
        return len(self.members) // 2 + 1

    # ---- editing (the `tapestry consortium` commands) ----

    def with_member(self, name: str, node_key: str) -> Consortium:
        """A version with `node_key` added to partner `name` (a new partner if there is none by that name). A signed
        version is not edited: the result is its successor draft (version + 1, no signatures)."""
        check_name(name)
        if peer_id_of_key(node_key.encode()) is None:
            raise ConsortiumError("--node must be an RSA public key as `tapestry identity` prints it (ssh-rsa ...)")
        if node_key in [k for m in self.members for k in m.nodes]:
            raise ConsortiumError("this node is already a member; nothing to add")
        members = list(self.members)
        index = next((i for i, m in enumerate(members) if m.name == name), None)
        if index is None:
            members.append(Member(name, (node_key,)))
        else:
            members[index] = Member(name, (*members[index].nodes, node_key))
        return replace(self._draft(), members=tuple(members))

    def with_spec(self, digest: str) -> Consortium:
        """A version that pins the run spec digest (a successor draft if this version is signed)."""
        check_spec_digest(digest)
        if digest == self.spec:
            raise ConsortiumError("this run spec is already pinned; nothing to change")
        return replace(self._draft(), spec=digest)

    def _draft(self) -> Consortium:
        """An unsigned version to edit: this one, or its successor if this one is signed."""
        base = self
        if self.signatures:
            base = replace(self, version=self.version + 1, genesis=self.consortium_id, previous=self.digest())
        return replace(base, signatures={})

    # ---- TOML ----

    def to_toml(self) -> str:
        data: dict[str, Any] = {"run_id": self.run_id, "version": self.version}
        if self.genesis:
            data["genesis"], data["previous"] = self.genesis, self.previous
        if self.spec:
            data["spec"] = self.spec
        data["members"] = [{"name": m.name, "nodes": list(m.nodes)} for m in self.members]
        data["signatures"] = [{"node": n, "signature": s} for n, s in sorted(self.signatures.items())]
        return tomli_w.dumps(data)

    @classmethod
    def from_toml(cls, text: str, source: str) -> Consortium:
        """Parse a consortium file (untrusted when it comes from a peer); ConsortiumError names what is wrong."""
        if len(text.encode()) > MAX_FILE_BYTES:
            raise ConsortiumError(f"{source} is larger than {MAX_FILE_BYTES} bytes; it is not a consortium file")
        try:
            data = tomllib.loads(text)
            return _parse(data)
        except tomllib.TOMLDecodeError as e:
            raise ConsortiumError(f"{source} is not valid TOML ({e}); fix or re-create it") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ConsortiumError(
                f"{source} is not a consortium file ({e}); create one: tapestry consortium create"
            ) from None


def check_spec_digest(digest: str) -> None:
    if not (len(digest) == 16 and all(c in "0123456789abcdef" for c in digest)):
        raise ConsortiumError(f"spec digest {digest!r} must be the 16 hex digits `tapestry spec show` prints")


def check_name(name: str) -> None:
    if not (0 < len(name) <= 64 and name.isprintable()):
        raise ConsortiumError(f"partner name {name!r} must be {NAME_RULE}")


def _parse(data: dict[str, Any]) -> Consortium:
    run_id, version = data["run_id"], data["version"]
    if not isinstance(run_id, str) or type(version) is not int or version < 1:
        raise ValueError("run_id must be a string and version a positive integer")
    genesis, previous = data.get("genesis", ""), data.get("previous", "")
    if not (isinstance(genesis, str) and isinstance(previous, str)) or (version > 1) != bool(genesis and previous):
        raise ValueError("a version after 1 names its genesis and previous digests, version 1 neither")
    raw_members = data.get("members", [])
    if not isinstance(raw_members, list) or len(raw_members) > MAX_MEMBERS:
        raise ValueError(f"members must be a list of at most {MAX_MEMBERS}")
    members = []
    for entry in raw_members:
        name, nodes = entry["name"], entry["nodes"]
        if not isinstance(name, str) or not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            raise ValueError("each member has a name and a list of node keys")
        check_name(name)
        members.append(Member(name, tuple(nodes)))
    if len({m.name for m in members}) != len(members):
        raise ValueError("two members have the same name")
    signatures = {}
    for entry in data.get("signatures", []):
        node, signature = entry["node"], entry["signature"]
        if not (isinstance(node, str) and isinstance(signature, str)):
            raise ValueError("each signature has a node and a signature string")
        signatures[node] = signature
    spec = data.get("spec", "")
    if not isinstance(spec, str):
        raise ValueError("spec must be a string")
    if spec:
        check_spec_digest(spec)
    return Consortium(run_id, version, tuple(members), genesis, previous, signatures, spec)


# ---- the rules ----


def check_genesis(consortium: Consortium, source: str) -> None:
    """Version 1 must be signed by a strict majority of its own partners."""
    if consortium.version != 1:
        return
    signing = consortium.partners_signing(consortium)
    if len(signing) < consortium.quorum():
        raise ConsortiumError(
            f"{source} is signed by {len(signing)} of its {len(consortium.members)} partners, it needs "
            f"{consortium.quorum()}: each partner signs with `tapestry consortium sign {source} --identity KEY`"
        )


def check_successor(current: Consortium, new: Consortium) -> None:
    """Raise ConsortiumError unless `new` validly replaces `current` (same run and genesis, the next version, chained
    to it, signed by a strict majority of `current`'s partners)."""
    if new.run_id != current.run_id or new.consortium_id != current.consortium_id:
        raise ConsortiumError(f"version {new.version} belongs to another consortium or run")
    if new.version != current.version + 1 or new.previous != current.digest():
        raise ConsortiumError(f"version {new.version} does not follow version {current.version}")
    signing = new.partners_signing(current)
    if len(signing) < current.quorum():
        raise ConsortiumError(
            f"version {new.version} is signed by {len(signing)} of the {len(current.members)} partners of version "
            f"{current.version}; it needs {current.quorum()}"
        )


# ---- files ----


def load(path: Path) -> Consortium:
    """Read a consortium file; a version 1 must carry its quorum (a later version is checked against its predecessor
    when it arrives, or trusted as installed by the operator when a node starts with it)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConsortiumError(f"cannot read consortium file {path} ({e.strerror}); check --consortium") from None
    consortium = Consortium.from_toml(text, str(path))
    check_genesis(consortium, str(path))
    return consortium


def load_draft(path: Path) -> Consortium:
    """Read a consortium file that may still lack signatures (for editing and signing)."""
    try:
        return Consortium.from_toml(path.read_text(), str(path))
    except OSError as e:
        raise ConsortiumError(f"cannot read consortium file {path} ({e.strerror})") from None


def save(consortium: Consortium, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    if not path.parent.is_dir():
        raise ConsortiumError(f"folder {path.parent} does not exist; create it first")
    atomic_write(path, lambda tmp: Path(tmp).write_text(consortium.to_toml()))


def names_of(consortium: Optional[Consortium]) -> Optional[dict[str, str]]:
    """Peer id -> partner name (None for an open swarm)."""
    return None if consortium is None else consortium.node_names()
