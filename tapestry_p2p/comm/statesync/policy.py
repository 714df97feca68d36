"""State sync policy, pure functions: which copy of the shared state a group converges on, and who serves what.

- `elected_state`: the state held by a majority of the peers that answer (a split within one round: most holders,
  ties to the smallest peer id); a peer that claims a later round wins nothing by it;
- `agreed_after_failure`: after a round that lost parts, peers whose round went through without a failure ("clean")
  all hold the same model, so the others defer to them;
- `assign`: tensors split across the peers that hold the wanted state (largest first, to the least-loaded peer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Optional

from tapestry_p2p.comm.statesync.wire import PeerState, StateId


def elected_state(states: Mapping[str, PeerState]) -> Optional[StateId]:
    """The state the peers should converge on: the one held by a strict majority of them, never the highest round.

    Without a majority, only a split among peers of one round (a round that failed for some) is settled, by most
    holders, ties to the smallest peer id; a state that claims a later round than others never wins without a
    majority, so one peer cannot take the others over by claiming to be ahead (S1/S2 in the security review).
    """
    if not states:
        return None
    counts = Counter(s.id for s in states.values())
    best = max(counts.values())
    if 2 * best > len(states):
        return next(state for state, count in counts.items() if count == best)
    if len({s.round for s in states.values()}) > 1:
        return None
    tied = {state for state, count in counts.items() if count == best}
    first_peer = min(peer for peer, s in states.items() if s.id in tied)
    return states[first_peer].id


def agreed_after_failure(states: Mapping[str, PeerState]) -> Optional[StateId]:
    """The state a group should agree on after a round that lost parts.

    A member whose round was clean received every part, and each part's bytes were the same for every member that
    received it, so all clean members hold one model: their elected state wins if there is one. Otherwise the state
    all of them elect (see `elected_state`).
    """
    clean = {peer: s for peer, s in states.items() if s.clean}
    return (elected_state(clean) if clean else None) or elected_state(states)


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
