"""The network side of the agreed group (`comm.agreement`): declare in the DHT, read the declarations at the cut-off,
exchange votes with the members over libp2p, and hand a committed group to the all-reduce.

`GroupVoting` is a mixin of `comm.averager.ExactAverager` (a hivemind DecentralizedAverager): `rpc_agree` is served
through hivemind's p2p servicer under the averager's prefix, and `_agree` runs in the averager process. Timeline of
round r, in DHT time, relative to the round's meeting E (`comm.matchmaking`):

    E - lead         the node stops its inner steps and hands in its pseudo-gradient (the node's side)
    ... E - margin   our declaration must be stored by then, or we abstain ("declared late")
    E                read every declaration of round r; vote; commit as soon as every member voted for our proposal
    E + window       votes still missing are asked for once more; if attempt 1 failed, the echo step reads the
                     declarations again and waits for every live member (another window), then attempt 2 votes

Every vote is a request answered with the answerer's own status, so one exchange tells both sides; a status that
arrives before we read (a faster peer) waits in a small inbox. Only members may vote (`security.membership`), a vote
counts only from the peer libp2p authenticated as its sender, and a declaration only from the peer its signing key
derives. Tuning: `Timing.window` must cover a DHT read and one round trip on the slowest link (3 s is ample on
continental links); raise `margin` when clocks between partners are further apart than half a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from tapestry_p2p.comm.agreement import (
    DECLARED_LATE,
    MET_EARLIER,
    PENDING,
    Agreement,
    Declaration,
    Outcome,
    Slot,
    Status,
)
from tapestry_p2p.security.identity import peer_id_of

logger = logging.getLogger(__name__)

KEPT_ROUNDS = 4  # agreements kept to answer late askers (a peer resuming from a stall asks what we decided)
INBOX_ROUNDS = 2  # statuses for rounds we have not read yet are kept for our next rounds only
INBOX_SLOTS = 8  # ... and for at most this many (round, meeting) slots
DECLARATION_LIFETIME = 120.0  # seconds after the meeting a declaration stays in the DHT
MEETING_TOLERANCE = 1e-3  # seconds: declarations for one meeting carry the same time (the proposal peers read)


@dataclass(frozen=True)
class Timing:
    """The agreed group's deadlines, in seconds (see the module docstring)."""

    margin: float = 0.5  # our declaration must be stored this long before the cut-off, or we abstain
    window: float = 3.0  # after the cut-off (or the start of attempt 2), how long votes may take
    ask_timeout: float = 1.5  # how long one vote request waits for its answer

    @property
    def longest(self) -> float:
        """The most seconds the agreement can take after the cut-off (two votes and the echo, each asked twice)."""
        return 3 * (self.window + 2 * self.ask_timeout)


class _Round:
    """One round's agreement in the averager process, with an event set whenever it changes."""

    def __init__(self, agreement: Agreement) -> None:
        self.agreement = agreement
        self.changed = asyncio.Event()


class GroupVoting:
    """Declaring, voting and committing (mixed into a DecentralizedAverager; uses its DHT, p2p and prefix)."""

    if TYPE_CHECKING:  # provided by hivemind's DecentralizedAverager and ExactAverager
        _p2p: Any
        _members: Any
        _owner: bytes
        dht: Any
        prefix: str
        schema_hash: bytes
        peer_id: PeerID

    _rounds: OrderedDict[Slot, _Round]
    _inbox: dict[Slot, dict[str, Status]]

    def _init_voting(self, timing: Timing) -> None:
        self.timing = timing
        self._rounds = OrderedDict()
        self._inbox = {}

    def declarations_key(self, round_no: int) -> str:
        """Where the declarations of round `round_no` live: one key per schema and round, one subkey per declarer."""
        return f"{self.prefix}.{self.schema_hash.hex()[:16]}.decl.{round_no}"

    # ---- the round, in the averager process ----

    async def _agree(self, declaration: Declaration, meeting: float) -> Outcome:
        """Declare, read at the cut-off, vote until the group is committed or we are out of it."""
        slot = (declaration.round, declaration.meeting)
        abstain = "" if await self._declare(declaration, meeting) else DECLARED_LATE
        await asyncio.sleep(max(0.0, meeting - get_dht_time()))
        declared = await self._read_declarations(declaration.round)
        view = {p: d for p, d in declared.items() if abs(d.meeting - declaration.meeting) < MEETING_TOLERANCE}
        if not abstain:
            view[declaration.peer] = declaration  # (our own store may not have reached every replica we read)
        else:
            view.pop(declaration.peer, None)
        earlier = sorted(p for p, d in declared.items() if d.meeting < declaration.meeting - MEETING_TOLERANCE)
        if set(view) == {declaration.peer} and earlier and not abstain:
            # nobody at our meeting, but others met for this round before (we missed their meeting): we follow them
            return Outcome(None, reason=MET_EARLIER, others=tuple(earlier))
        state = _Round(Agreement(declaration.peer, self.schema_hash, view, abstain))
        self._rounds[slot] = state
        while len(self._rounds) > KEPT_ROUNDS:
            self._rounds.popitem(last=False)
        for peer, status in self._inbox.pop(slot, {}).items():
            state.agreement.receive(peer, status)
        await self._vote(slot, state)
        outcome = state.agreement.outcome
        assert outcome is not None
        if outcome.group is not None:  # tell the members (one that missed a vote learns from it that all voted)
            self._announce(slot, state, outcome.group.members)
        return outcome

    async def _declare(self, declaration: Declaration, meeting: float) -> bool:
        """Store our declaration; whether it was stored in time (by the cut-off minus the margin)."""
        try:
            stored = await self.dht.store(
                self.declarations_key(declaration.round),
                declaration.pack(),
                expiration_time=meeting + DECLARATION_LIFETIME,
                subkey=self._owner,
                return_future=True,
            )
        except (TimeoutError, OSError, RuntimeError) as e:
            logger.warning("could not store our declaration for round %d (%r)", declaration.round + 1, e)
            return False
        in_time = bool(stored) and get_dht_time() <= meeting - self.timing.margin
        if not in_time:
            logger.info("our declaration for round %d was stored after the cut-off", declaration.round + 1)
        return in_time

    async def _read_declarations(self, round_no: int) -> dict[str, Declaration]:
        """Every valid declaration of the round in the DHT: signed by a member, speaking for its signer only."""
        try:
            found = await self.dht.get(self.declarations_key(round_no), latest=True, return_future=True)
        except (TimeoutError, OSError, RuntimeError) as e:
            logger.warning("could not read the declarations of round %d (%r)", round_no + 1, e)
            return {}
        if found is None or not isinstance(found.value, dict):
            return {}
        view = {}
        for subkey, entry in found.value.items():
            signer = peer_id_of(subkey) if isinstance(subkey, bytes) else None
            parsed = Declaration.parse(signer, getattr(entry, "value", None), round_no)
            if parsed is not None and self._members.allows(parsed.peer):
                view[parsed.peer] = parsed
        return view

    async def _vote(self, slot: Slot, state: _Round) -> None:
        """Exchange statuses until the agreement is decided: at every change, and at each attempt's deadline."""
        agreement = state.agreement
        phase: Any = None
        deadline = 0.0
        asked: set[tuple[Any, str]] = set()
        while agreement.outcome is None:
            if agreement.phase != phase:
                phase, deadline = agreement.phase, get_dht_time() + self.timing.window
            if phase == "echo" and not agreement.learnt:  # a declaration our first read missed may be in by now
                declared = await self._read_declarations(slot[0])
                agreement.learn({p: d for p, d in declared.items() if abs(d.meeting - slot[1]) < MEETING_TOLERANCE})
                continue
            for peer in agreement.peers:
                if (phase, peer) not in asked:
                    asked.add((phase, peer))
                    asyncio.create_task(self._ask(slot, state, peer))
            state.changed.clear()
            try:
                await asyncio.wait_for(state.changed.wait(), timeout=max(0.0, deadline - get_dht_time()))
                continue
            except TimeoutError:
                pass
            # deadline: ask once more; who still says nothing that counts for this step (no answer, "pending", or
            # still voting in attempt 1 when everyone echoes) is silent
            await asyncio.gather(*(self._ask(slot, state, p) for p in agreement.missing()))
            if agreement.phase == phase and agreement.outcome is None:
                agreement.deadline_passed(agreement.missing())

    def _status_for(self, state: _Round, peer: str) -> Status:
        """What we tell `peer` about our agreement: our status (the same for every peer; a test's liar overrides it)."""
        return state.agreement.status

    async def _ask(self, slot: Slot, state: _Round, peer: str) -> bool:
        """Send our status to `peer`; its answer is its own status. Returns whether it answered."""
        request = runtime_pb2.ExpertRequest(metadata=self._status_for(state, peer).pack(slot))
        try:
            stub = type(self).get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)  # type: ignore[attr-defined]
            response = await asyncio.wait_for(stub.rpc_agree(request), self.timing.ask_timeout)
        except Exception as e:  # noqa: BLE001 (a peer that does not answer, whatever the cause, is a silent peer)
            logger.debug("no answer from %s to our vote for round %d: %r", peer, slot[0] + 1, e)
            return False
        answer = Status.unpack(response.metadata)
        if answer is None or answer[0] != slot:
            return False
        self._receive(state, peer, answer[1])
        return True

    def _announce(self, slot: Slot, state: _Round, members: Sequence[str]) -> None:
        for peer in members:
            if peer != self.peer_id.to_base58():
                asyncio.create_task(self._ask(slot, state, peer))

    def _receive(self, state: _Round, peer: str, status: Status) -> None:
        before = state.agreement.status
        state.agreement.receive(peer, status)
        if state.agreement.status != before:
            state.changed.set()

    async def _decision(self, group_id: bytes) -> bool:
        """If we are still voting for `group_id`, wait until we decide; whether we committed it (a reducer asks)."""
        for state in self._rounds.values():
            if state.agreement.pending_group() == group_id:
                deadline = get_dht_time() + self.timing.longest
                while state.agreement.outcome is None and get_dht_time() < deadline:
                    state.changed.clear()
                    try:
                        await asyncio.wait_for(state.changed.wait(), timeout=deadline - get_dht_time())
                    except TimeoutError:
                        break
            outcome = state.agreement.outcome
            if outcome is not None and outcome.group is not None and outcome.group.group_id == group_id:
                return True
        return False

    # ---- the server ----

    async def rpc_agree(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A member's status for a round (its vote, commit or "out"); we answer with ours."""
        peer = context.remote_id.to_base58()
        parsed = Status.unpack(request.metadata)
        if parsed is None or not self._members.allows(peer):
            logger.debug("ignored a malformed vote, or one from a non-member (%s)", peer)
            return runtime_pb2.ExpertResponse()
        slot, status = parsed
        state = self._rounds.get(slot)
        if state is not None:
            self._receive(state, peer, status)
            return runtime_pb2.ExpertResponse(metadata=self._status_for(state, peer).pack(slot))
        self._keep_early(slot, peer, status)
        return runtime_pb2.ExpertResponse(metadata=PENDING.pack(slot))

    def _keep_early(self, slot: Slot, peer: str, status: Status) -> None:
        """A status for a slot we have not read yet (a faster peer): kept for when we do, within bounds."""
        newest = max((r for r, _ in self._rounds), default=-1)
        if self._rounds and not newest <= slot[0] <= newest + INBOX_ROUNDS:
            return
        if slot not in self._inbox and len(self._inbox) >= INBOX_SLOTS:
            self._inbox.pop(min(self._inbox))
        box = self._inbox.setdefault(slot, {})
        if peer in box or len(box) < 256:  # (one entry per member: a peer can only replace its own)
            box[peer] = status
