"""State sync on the wire: what a peer says it holds, and how slices of the shared state are requested.

A late joiner, a peer that was away, and a peer whose round ended out of step with its group all download the shared
state (theta and the outer momentum, as `(metadata, tensors)` from the node's state function). Here:

- every candidate first answers a small *info* request: its round, the hash of its theta, and its tensor sizes;
- the copy to adopt is the one a strict majority of the answering peers hold (`policy.elected_state`; a peer that
  claims a later round wins nothing by it); only peers holding it serve. After a round that lost parts, peers whose
  round went through without a failure ("clean") all hold the same model, so the others defer to them
  (`agreed_state` in averaging);
- the tensors are split across those peers (largest first, to the least-loaded peer), fetched concurrently, and a
  peer that fails mid-way has its share handed to the others;
- the downloader checks the result against the elected hash before using it (`node/sync.py`, `StateSync.adopt`).

Policy (which state is elected, who serves what) is in `policy.py`, the streams in `transport.py`, the downloads a
node asks for in `client.py`.

Wire format (hivemind p2p streams, protobufs hivemind already has): the request is a `runtime_pb2.ExpertRequest`
whose `metadata` is msgpack `{"hash": str | None, "tensors": [index, ...]}`; the answer is a stream of
`averaging_pb2.DownloadData`, the first carrying msgpack `{"round", "hash", "numel": [...], "clean", "in_flight"}` and
the rest the requested tensors in order, uncompressed float32, split for streaming. A server whose hash is not the
requested one sends the info and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, TypeGuard

import msgpack

MAX_HASH_LENGTH = 64
UNPACK_ERRORS = (msgpack.UnpackException, ValueError, KeyError, TypeError)  # what untrusted msgpack input raises


def is_count(value: object) -> TypeGuard[int]:
    """A non-negative int from untrusted input (msgpack's booleans are ints in Python, and are refused)."""
    return type(value) is int and value >= 0


class StateId(NamedTuple):
    """Which shared state: the round it completed and the hash of theta's bytes."""

    round: int
    hash: str


@dataclass(frozen=True)
class PeerState:
    """What one peer holds: its state, and whether its last round went through without losing any part (`clean`)."""

    round: int
    hash: str
    clean: bool = True

    @property
    def id(self) -> StateId:
        return StateId(self.round, self.hash)


@dataclass(frozen=True)
class StateInfo:
    """What a serving peer says it holds, with the sizes of the tensors it would send."""

    round: int
    hash: str
    numel: tuple[int, ...]
    clean: bool = True  # the peer's last round went through without losing any part
    in_flight: bool = False  # the peer's next round is under way (--overlap): it serves the state before that round

    @property
    def id(self) -> StateId:
        return StateId(self.round, self.hash)

    @property
    def state(self) -> PeerState:
        return PeerState(self.round, self.hash, self.clean)

    @property
    def nbytes(self) -> int:
        return 4 * sum(self.numel)

    def pack(self) -> bytes:
        return msgpack.packb(
            {
                "round": self.round,
                "hash": self.hash,
                "numel": list(self.numel),
                "clean": self.clean,
                "in_flight": self.in_flight,
            }
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Optional[StateInfo]:
        """Parse an untrusted info message; None if it is malformed."""
        try:
            data = msgpack.unpackb(raw)
            round_no, digest, numel, clean = data["round"], data["hash"], data["numel"], data["clean"]
            in_flight = data["in_flight"]
        except UNPACK_ERRORS:
            return None
        if not (isinstance(clean, bool) and isinstance(in_flight, bool)):
            return None
        if not (is_count(round_no) and isinstance(digest, str) and len(digest) <= MAX_HASH_LENGTH):
            return None
        if not (isinstance(numel, list) and all(is_count(n) for n in numel)):
            return None
        return cls(round_no, digest, tuple(numel), clean, in_flight)


def pack_request(want_hash: Optional[str], tensors: Sequence[int]) -> bytes:
    return msgpack.packb({"hash": want_hash, "tensors": list(tensors)})


def unpack_request(raw: bytes, n_tensors: int) -> Optional[tuple[Optional[str], list[int]]]:
    """Parse an untrusted slice request; None if malformed or out of range."""
    try:
        data = msgpack.unpackb(raw)
        want, indices = data["hash"], data["tensors"]
    except UNPACK_ERRORS:
        return None
    if want is not None and not isinstance(want, str):
        return None
    if not isinstance(indices, list) or not all(is_count(i) and i < n_tensors for i in indices):
        return None
    return want, indices
