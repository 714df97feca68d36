"""Declarations in a real DHT (signed records on loopback): what a partner declares last is what the others read."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from helpers import start_signed_dht

from tapestry_p2p.comm.agreement import Declaration
from tapestry_p2p.comm.voting import GroupVoting, Timing
from tapestry_p2p.security.membership import Members

pytestmark = pytest.mark.e2e


class Declarer(GroupVoting):
    """GroupVoting's declaring and reading, without an averager around it."""

    def __init__(self, dht, owner: bytes) -> None:
        self.dht, self._owner, self._members = dht, owner, Members.open()
        self.prefix, self.schema_hash = "declarations_avg", bytes(range(16))
        self._init_voting(Timing())


def test_a_declaration_for_an_earlier_meeting_replaces_the_one_for_a_later_meeting():
    """We called a meeting, declared for it, then read an earlier proposal: the DHT keeps one record per subkey (the
    one that expires last), so the second declaration must outlive the first, or every node refuses it."""
    with contextlib.ExitStack() as stack:
        dht, owner = start_signed_dht(stack, [])
        peer = dht.peer_id.to_base58()
        voting = Declarer(dht, owner)

        now = voting.clock.now()
        ours, earlier = Declaration(peer, 3, now + 30.0, "abc"), Declaration(peer, 3, now + 20.0, "abc")

        async def declare_twice() -> dict[str, Declaration]:
            assert await voting._declare(ours, ours.meeting)
            assert await voting._declare(earlier, earlier.meeting)  # (refused by the DHT before the fix)
            return await voting._read_declarations(3)

        assert asyncio.run(declare_twice()) == {peer: earlier}
