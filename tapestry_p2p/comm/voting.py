"""The network side of the agreed group (`comm.agreement`): declare in the DHT, read the declarations at the cut-off,
exchange votes with the members over libp2p, and hand a committed group to the all-reduce.

`GroupVoting` is a mixin of `comm.averager.ExactAverager` (a hivemind DecentralizedAverager): `rpc_agree` is served
through hivemind's p2p servicer under the averager's prefix, and `_agree` runs in the averager process. Timeline of
round r, in DHT time, relative to the round's meeting E (`comm.matchmaking`):

    as soon as the node knows E: it asks us to store its declaration (`intend`), and trains on
    E - lead         the node stops its inner steps and hands in its pseudo-gradient and contribution
    ... E - margin   our declaration must be stored by then, or we abstain ("declared late")
    E                read every declaration of round r; vote; commit as soon as every member voted for our proposal
    E + window       votes still missing (or not yet holding ours) are asked for once more; each vote stands until
                     this step's deadline plus one ask, and a member commits on an attempt-2 vote only until half a
                     second before (`agreement.Lease`); if attempt 1 failed, the echo step reads the declarations
                     again and waits for every live member (another window), then attempt 2 votes

Every vote is a request answered with the answerer's own status, so one exchange tells both sides; a status that
arrives before we read (a faster peer) waits in a small inbox. Only members may vote (`security.membership`), a vote
counts only from the peer libp2p authenticated as its sender, and a declaration only from the peer its signing key
derives. Tuning: `Timing.window` must cover a DHT read and one round trip on the slowest link (3 s is ample on
continental links). Deadlines are on the swarm's clock (`comm.swarm_clock`: our clock corrected by the median
offset to our peers'), so partners whose machines' clocks are apart still read the declarations at one real time.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import msgpack
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.mpfuture import MPFuture

from tapestry_p2p.comm.agreement import (
    DECLARED_LATE,
    MET_EARLIER,
    PENDING,
    Agreement,
    Contribution,
    Declaration,
    Lease,
    Outcome,
    Slot,
    Status,
    met_earlier,
)
from tapestry_p2p.comm.matchmaking import DECLARE_LEAD, POLL_INTERVAL
from tapestry_p2p.comm.swarm_clock import CLOCK_PERIOD, MAX_SAMPLE_RTT, SAMPLED_PEERS, SwarmClock, offset_of
from tapestry_p2p.security.identity import peer_id_of

logger = logging.getLogger(__name__)

KEPT_ROUNDS = 4  # agreements kept to answer late askers (a peer resuming from a stall asks what we decided)
INBOX_ROUNDS = 2  # statuses for rounds we have not read yet are kept for our next rounds only
INBOX_SLOTS = 8  # ... and for at most this many (round, meeting) slots
DECLARATION_LIFETIME = 120.0  # seconds after the meeting a declaration stays in the DHT
MEETING_TOLERANCE = 1e-3  # seconds: declarations for one meeting carry the same time (the proposal peers read)
STORE_DECAY = 0.8  # per round: how fast a slow declaration store is forgotten (the lead shrinks back)


@dataclass(frozen=True)
class Timing:
    """The agreed group's deadlines, in seconds (see the module docstring)."""

    margin: float = 0.5  # our declaration must be stored this long before the cut-off, or we abstain
    window: float = 3.0  # after the cut-off (or the start of attempt 2), how long votes may take
    ask_timeout: float = 1.5  # how long one vote request waits for its answer
    lease_margin: float = 0.5  # a vote counts until this long before its voter's deadline (our commit must reach it)

    def lead(self, store_seconds: float) -> float:
        """How long before a meeting to stop training: enough to compute our update and store our declaration before
        the cut-off's margin, at the store latency measured lately (with half as much again to spare)."""
        return max(DECLARE_LEAD, self.margin + 1.5 * store_seconds + 0.25)

    def ahead(self, window: float, store_seconds: float) -> float:
        """How far ahead to call a meeting: the round `window`, or more while the DHT is slow (a loaded machine, a
        swarm of many partners on few cores). A peer learns the meeting after our store of it, a poll and a read, then
        stores its declaration by the cut-off's margin: three DHT operations at the store latency measured lately,
        with a second to spare. (16 partners on 2 cores stored declarations in up to 2.4 s: a 4 s window left some
        of them late every round, and each one left out of a round missed the next one too.)"""
        return max(window, self.margin + POLL_INTERVAL + 3 * store_seconds + 1.0)

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

    _running_groups: dict[bytes, asyncio.Future]  # (comm.averager) committed group id -> its runner, once built
    _rounds: OrderedDict[Slot, _Round]
    _inbox: dict[Slot, dict[str, Status]]

    def _init_voting(self, timing: Timing) -> None:
        self.timing = timing
        self.clock = SwarmClock()  # every deadline of the agreement is on the swarm's clock
        # how long our declarations take to store (decaying maximum, shared memory): the node stops training that
        # much earlier, so a slow DHT makes rounds longer instead of leaving everyone out as "declared late"
        self.store_seconds = multiprocessing.Value("d", 0.0)
        self._rounds = OrderedDict()
        self._inbox = {}
        self._clock_peers: set[str] = set()  # peers seen declaring: whom we ask for their clock
        self._intents: dict[Slot, asyncio.Task] = {}  # our declarations stored or being stored -> whether in time
        self._declared_until: dict[int, float] = {}  # round -> the expiration of our latest declaration for it

    def declarations_key(self, round_no: int) -> str:
        """Where the declarations of round `round_no` live: one key per schema and round, one subkey per declarer."""
        return f"{self.prefix}.{self.schema_hash.hex()[:16]}.decl.{round_no}"

    # ---- the round, in the averager process ----

    async def _intend(self, declaration: Declaration, future: Optional[MPFuture] = None) -> None:
        """Store our declaration for a meeting we now know (the node calls this while it still trains)."""
        slot = (declaration.round, declaration.meeting)
        if slot not in self._intents:
            self._intents[slot] = asyncio.create_task(self._declare(declaration, declaration.meeting))
            for old in [s for s in self._intents if s[0] < declaration.round - 1]:
                self._intents.pop(old)
                self._declared_until.pop(old[0], None)

    async def _agree(self, declaration: Declaration, contribution: Contribution) -> Outcome:
        """At the meeting: our declaration in time (stored now if the node did not ask before), read the round's
        declarations at the cut-off, vote until the group is committed or we are out of it."""
        meeting = declaration.meeting
        slot = (declaration.round, meeting)
        await self._intend(declaration)
        abstain = "" if await self._intents[slot] else DECLARED_LATE
        await asyncio.sleep(max(0.0, meeting - self.clock.now()))
        declared = await self._read_declarations(declaration.round)
        self._clock_peers.update(p for p in declared if p != declaration.peer)
        view = {p: d for p, d in declared.items() if abs(d.meeting - meeting) < MEETING_TOLERANCE}
        if not abstain:
            view[declaration.peer] = declaration  # (our own store may not have reached every replica we read)
        else:
            view.pop(declaration.peer, None)
        earlier = met_earlier(declared, view, meeting, MEETING_TOLERANCE)
        if earlier and not abstain:
            return Outcome(None, reason=MET_EARLIER, others=earlier)
        lease = Lease(self.clock.now, self.timing.lease_margin)
        state = _Round(Agreement(declaration.peer, self.schema_hash, view, contribution, abstain, lease))
        self._rounds[slot] = state
        while len(self._rounds) > KEPT_ROUNDS:
            self._rounds.popitem(last=False)
        for peer, status in self._inbox.pop(slot, {}).items():
            state.agreement.receive(peer, status)
        await self._vote(slot, state)
        outcome = state.agreement.outcome
        assert outcome is not None
        if outcome.group is not None:  # tell the members (one that missed a vote learns from it that all voted)
            self._expect_parts(outcome.group.group_id)  # members may send their parts from now on: they wait for us
            self._announce(slot, state, outcome.group.members)
            # a member whose vote we never received ourselves (we committed through another's commit) tells us what
            # its update weighs and measures now; one that does not answer gets its parts refused by our reducer
            told = state.agreement.contributions
            await asyncio.gather(*(self._ask(slot, state, p) for p in outcome.group.members if p not in told))
            outcome.contributions = {p: told[p] for p in outcome.group.members if p in told}
        return outcome

    async def _declare(self, declaration: Declaration, meeting: float) -> bool:
        """Store our declaration; whether it was stored in time (by the cut-off minus the margin)."""
        started = get_dht_time()
        # the DHT keeps one record per subkey, the one that expires last: a declaration for an earlier meeting (a
        # proposal we read after calling our own) must still expire after the one it replaces, or it is refused
        expiration = max(meeting + DECLARATION_LIFETIME, self._declared_until.get(declaration.round, 0.0) + 1e-3)
        self._declared_until[declaration.round] = expiration
        try:
            stored = await self.dht.store(
                self.declarations_key(declaration.round),
                declaration.pack(),
                expiration_time=expiration,
                subkey=self._owner,
                return_future=True,
                await_all_replicas=False,  # stored once, in time; the other replicas follow in the background
            )
        except (TimeoutError, OSError, RuntimeError) as e:
            logger.warning("could not store our declaration for round %d (%r)", declaration.round + 1, e)
            return False
        took = get_dht_time() - started
        self.store_seconds.value = max(took, STORE_DECAY * self.store_seconds.value)
        if not stored:
            logger.info("the DHT did not take our declaration for round %d", declaration.round + 1)
            return False
        in_time = self.clock.now() <= meeting - self.timing.margin
        if not in_time:
            late = self.clock.now() - (meeting - self.timing.margin)
            logger.info("our declaration for round %d was stored %.2fs after the cut-off", declaration.round + 1, late)
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
                phase, deadline = agreement.phase, self.clock.now() + self.timing.window
                agreement.until = deadline + self.timing.ask_timeout  # we stand by this step's vote through its asks
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
                await asyncio.wait_for(state.changed.wait(), timeout=max(0.0, deadline - self.clock.now()))
                continue
            except TimeoutError:
                pass
            # deadline: ask once more; who still says nothing that counts for this step (no answer, "pending", or
            # still voting in attempt 1 when everyone echoes) is silent
            await asyncio.gather(*(self._ask(slot, state, p) for p in agreement.missing()))
            await self._stand(state, phase, agreement.until)
            if agreement.phase == phase and agreement.outcome is None:
                agreement.deadline_passed(agreement.missing())

    async def _stand(self, state: _Round, phase: Any, until: float) -> None:
        """Keep this step open until `until`, the time our vote says it stands (a member may commit on it until
        shortly before), unless the agreement decides or moves on first."""
        agreement = state.agreement
        await self._wait_while(state, lambda: agreement.outcome is None and agreement.phase == phase, until)

    async def _wait_while(self, state: _Round, holds: Callable[[], bool], until: float) -> None:
        """Wait on `state`'s changes while `holds()` does, until `until` on the swarm clock."""
        while holds() and self.clock.now() < until:
            state.changed.clear()
            try:
                await asyncio.wait_for(state.changed.wait(), timeout=until - self.clock.now())
            except TimeoutError:
                return

    def _expect_parts(self, group_id: bytes) -> None:
        """From our commit on, parts of that group wait for our all-reduce's runner (`comm.averager`), even while we
        still ask members for their contributions: refusing them would lose our span for everyone."""
        self._running_groups.setdefault(group_id, asyncio.get_running_loop().create_future())

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
        """If we are still voting for `group_id`, wait until we decide; whether we committed it then (a reducer asks
        on a groupmate's first part; a group we committed before is in `_running_groups`, or its round is over)."""
        state = next((s for s in self._rounds.values() if s.agreement.may_commit(group_id)), None)
        if state is None:
            return False
        agreement = state.agreement
        await self._wait_while(state, lambda: agreement.outcome is None, self.clock.now() + self.timing.longest)
        outcome = agreement.outcome
        return outcome is not None and outcome.group is not None and outcome.group.group_id == group_id

    # ---- the swarm's clock ----

    async def _keep_clock(self) -> None:
        """Measure our offset from the swarm's median clock every CLOCK_PERIOD seconds (see comm.swarm_clock)."""
        while True:
            peers = sorted(self._clock_peers)
            chosen = random.sample(peers, min(SAMPLED_PEERS, len(peers)))
            offsets = await asyncio.gather(*(self._clock_offset(peer) for peer in chosen))
            self.clock.update([o for o in offsets if o is not None])
            await asyncio.sleep(CLOCK_PERIOD)

    async def _clock_offset(self, peer: str) -> Optional[float]:
        requested = get_dht_time()
        try:
            stub = type(self).get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)  # type: ignore[attr-defined]
            response = await asyncio.wait_for(stub.rpc_clock(runtime_pb2.ExpertRequest()), MAX_SAMPLE_RTT)
            theirs = msgpack.unpackb(response.metadata)
        except Exception as e:  # noqa: BLE001 (a peer that does not answer, whatever the cause, tells us nothing)
            logger.debug("no clock from %s: %r", peer, e)
            return None
        answered = get_dht_time()
        if type(theirs) is not float or answered - requested > MAX_SAMPLE_RTT:
            return None
        return offset_of(requested, answered, theirs)

    async def rpc_clock(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Our raw clock (never the corrected one: estimates must not feed back into each other); members only."""
        if not self._members.allows(context.remote_id.to_base58()):
            return runtime_pb2.ExpertResponse()
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb(get_dht_time()))

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
