"""State sync policy, pure functions: which copy of the shared state a group converges on, and who serves what.

- `canonical_state`: the state held by most peers of the highest round (ties: the smallest peer id);
- `agreed_after_failure`: after a round that lost parts, peers whose round went through without a failure ("clean")
  all hold the same model, so the others defer to them;
- `assign`: tensors split across the peers that hold the wanted state (largest first, to the least-loaded peer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Optional

from tapestry_p2p.comm.statesync.wire import PeerState, StateId


def canonical_state(states: Mapping[str, PeerState]) -> Optional[StateId]:
    """The state the peers should converge on: most holders of the highest round, ties to the smallest peer id."""
    if not states:
        return None
    top_round = max(s.round for s in states.values())
    counts = Counter(s.hash for s in states.values() if s.round == top_round)
    best = max(counts.values())
    tied = {h for h, c in counts.items() if c == best}
    first_peer = min(peer for peer, s in states.items() if s.round == top_round and s.hash in tied)
    return states[first_peer].id


def agreed_after_failure(states: Mapping[str, PeerState]) -> Optional[StateId]:
    """The state a group should agree on after a round that lost parts.

    A member whose round was clean received every part, and each part's bytes were the same for every member that
    received it, so all clean members hold one model: it wins if there is one. Otherwise the canonical state.
    """
    clean = {peer: s for peer, s in states.items() if s.clean}
    return canonical_state(clean or states)


def assign(
    numel: Sequence[int], servers: Sequence[str], indices: Optional[Sequence[int]] = None
) -> dict[str, list[int]]:
    """Split tensors (all, or `indices`) across servers: largest first, each to the server with the fewest values."""
    if not servers:
        raise ValueError("no server to assign tensors to")
    load = {server: 0 for server in servers}
    plan: dict[str, list[int]] = {server: [] for server in servers}
    todo = range(len(numel)) if indices is None else indices
    for index in sorted(todo, key=lambda i: (-numel[i], i)):
        server = min(servers, key=lambda s: (load[s], servers.index(s)))
        plan[server].append(index)
        load[server] += numel[index]
    return {server: sorted(chosen) for server, chosen in plan.items() if chosen}
