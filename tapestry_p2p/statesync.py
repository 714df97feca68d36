"""Downloading the shared state from peers: which copy is canonical, who serves which tensors, what goes on the wire.

A late joiner, a peer that was away, and a peer whose round ended out of step with its group all download the shared
state (theta and the outer momentum, as `(metadata, tensors)` from the node's state function). Here:

- every candidate first answers a small *info* request: its round, the hash of its theta, and its tensor sizes;
- the canonical copy is the one held by most peers of the highest round (ties: the smallest peer id), as in
  `canonical_state`; only peers holding it serve. After a round that lost parts, peers whose round went through
  without a failure ("clean") all hold the same model, so the others defer to them (`agreed_state` in averaging);
- the tensors are split across those peers (largest first, to the least-loaded peer), fetched concurrently, and a
  peer that fails mid-way has its share handed to the others;
- the downloader checks the result against the canonical hash before using it (the node does, see `Node._adopt`).

Wire format (hivemind p2p streams, protobufs hivemind already has): the request is a `runtime_pb2.ExpertRequest`
whose `metadata` is msgpack `{"hash": str | None, "tensors": [index, ...]}`; the answer is a stream of
`averaging_pb2.DownloadData`, the first carrying msgpack `{"round", "hash", "numel": [...], "clean"}` and the rest the
requested tensors in order, uncompressed float32, split for streaming. A server whose hash is not the requested one
sends the info and nothing else.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import msgpack

StateId = Tuple[int, str]  # (round, theta hash)


@dataclass(frozen=True)
class StateInfo:
    """What a serving peer says it holds."""

    round: int
    hash: str
    numel: Tuple[int, ...]
    clean: bool = True  # the peer's last round went through without losing any part

    @property
    def id(self) -> StateId:
        return self.round, self.hash

    @property
    def nbytes(self) -> int:
        return 4 * sum(self.numel)

    def pack(self) -> bytes:
        return msgpack.packb({"round": self.round, "hash": self.hash, "numel": list(self.numel), "clean": self.clean})

    @classmethod
    def unpack(cls, raw: bytes) -> Optional["StateInfo"]:
        """Parse an untrusted info message; None if it is malformed."""
        try:
            data = msgpack.unpackb(raw)
            round_no, digest, numel, clean = data["round"], data["hash"], data["numel"], data.get("clean", True)
        except Exception:
            return None
        if not isinstance(clean, bool):
            return None
        if not (isinstance(round_no, int) and round_no >= 0 and isinstance(digest, str) and len(digest) <= 64):
            return None
        if not (isinstance(numel, list) and all(isinstance(n, int) and n >= 0 for n in numel)):
            return None
        return cls(round_no, digest, tuple(numel), clean)


def pack_request(want_hash: Optional[str], tensors: Sequence[int]) -> bytes:
    return msgpack.packb({"hash": want_hash, "tensors": list(tensors)})


def unpack_request(raw: bytes, n_tensors: int) -> Optional[Tuple[Optional[str], List[int]]]:
    """Parse an untrusted slice request; None if malformed or out of range."""
    try:
        data = msgpack.unpackb(raw)
        want, indices = data["hash"], data["tensors"]
    except Exception:
        return None
    if want is not None and not isinstance(want, str):
        return None
    if not isinstance(indices, list) or not all(isinstance(i, int) and 0 <= i < n_tensors for i in indices):
        return None
    return want, indices


def canonical_state(states: Mapping[str, Any]) -> Optional[StateId]:
    """(round, hash) the peers should converge on: most holders of the highest round, ties to the smallest peer id.

    `states` maps peer id to `{"round": int, "hash": str}` (or a StateInfo); malformed entries are ignored.
    """
    valid: Dict[str, StateId] = {}
    for peer, data in states.items():
        if isinstance(data, StateInfo):
            valid[peer] = data.id
        elif isinstance(data, dict) and isinstance(data.get("round"), int) and isinstance(data.get("hash"), str):
            valid[peer] = (int(data["round"]), data["hash"])
    if not valid:
        return None
    top_round = max(r for r, _ in valid.values())
    counts = Counter(h for r, h in valid.values() if r == top_round)
    best = max(counts.values())
    tied = {h for h, c in counts.items() if c == best}
    first_peer = min(peer for peer, (r, h) in valid.items() if r == top_round and h in tied)
    return valid[first_peer]


def agreed_after_failure(states: Mapping[str, Dict[str, Any]]) -> Optional[StateId]:
    """The state a group should agree on after a round that lost parts, from each member's `{round, hash, clean}`.

    A member whose round was clean received every part, and each part's bytes were the same for every member that
    received it, so all clean members hold one model: it wins if there is one. Otherwise the canonical state.
    """
    clean = {peer: s for peer, s in states.items() if s.get("clean") is True}
    return canonical_state(clean or states)


def assign(
    numel: Sequence[int], servers: Sequence[str], indices: Optional[Sequence[int]] = None
) -> Dict[str, List[int]]:
    """Split tensors (all, or `indices`) across servers: largest first, each to the server with the fewest values."""
    if not servers:
        raise ValueError("no server to assign tensors to")
    load = {server: 0 for server in servers}
    plan: Dict[str, List[int]] = {server: [] for server in servers}
    todo = range(len(numel)) if indices is None else indices
    for index in sorted(todo, key=lambda i: (-numel[i], i)):
        server = min(servers, key=lambda s: (load[s], servers.index(s)))
        plan[server].append(index)
        load[server] += numel[index]
    return {server: sorted(chosen) for server, chosen in plan.items() if chosen}
