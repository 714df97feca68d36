"""The agreed group of a round: who averages round r, computed by every member from the same signed inputs.

Replaces hivemind's leader/follower matchmaking, a one-phase commit whose two sides time out independently (a leader
could form a group with a follower that had already gone alone: docs/ARCHITECTURE.md, "Agreement"). Here, for round r
(the round of the shared model going in), among peers of one schema:

1. **Declare.** Each partner that will average round r stores a `Declaration` (its peer id, the meeting, the state it
   holds: round and hash) under the round's DHT key, in its own owner-signed subkey, as soon as it knows the meeting
   (it trains on meanwhile), and by the cut-off. Only the owner can write its entry (hivemind's RSASignatureValidator),
   and an entry speaks only for the peer its signing key derives (`security.identity.peer_id_of`). What its update
   weighs and measures (`Contribution`: inner steps, norm), known only when it stops training, travels in its own
   votes: nobody relays anybody's metadata.
2. **View.** At the cut-off each reads the key. Its `Proposal` is the set of valid declarations holding the state a
   majority of declarers hold (`statesync.policy.elected_state`); its group id is the hash of the round, the schema
   and every member's declared entry, sorted.
3. **Vote.** Each sends its vote (attempt, group id, members, and whose votes for that group it holds) to every
   member of its proposal; every answer carries the answerer's own status. A peer *commits* when every other member
   of its proposal voted for it and said it holds our vote too (or committed it), and tells the members (a commit
   announcement: a peer that missed one vote learns that everybody voted). A vote alone is not enough: its sender may
   have given up on the group before our own vote reached it (a vote held over from before we voted, or one whose
   answer it never got), and a group committed on it would list a member that is out. A peer that has committed
   never votes again, so no other group containing it can ever be committed.
4. **Retry.** If the votes differ (the DHT gave members different views) or a member stays silent past the vote
   deadline (asked once more, then dropped), attempt 2 proposes the intersection of the views received, without the
   silent or abstaining members; if that fails too the peer is out of the round, knowing why.

A peer outside the group knows why (`Outcome.reason`: declared late, state differs, not seen by a member, silent, no
agreement); a round that nobody else declared is a round alone. Reducers refuse parts of any other group id at the
first message (`comm.averager`).

This module is pure (no network; the clock is passed in, as a `Lease`): `Agreement` is the state machine one peer
runs per round, fed with the statuses its peers send; `comm.averager` drives it over the network. When every commit
reaches its members before their deadlines, every member of a committed group commits it. The one window no protocol
without a master can close (a commit announced, and both the announcement and the member's last ask lost or later
than its deadline: a stall of seconds right then) costs the committed members that member's span, never a split: its
own outcome is a round outside the group, which the node repairs by adopting the group's state.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import msgpack

from tapestry_p2p.comm.statesync.policy import elected_state
from tapestry_p2p.comm.statesync.wire import MAX_HASH_LENGTH, UNPACK_ERRORS, PeerState, is_count

MAX_NORM = 1e30  # a declared norm above this is malformed
MAX_MEMBERS = 256  # a vote naming more members is malformed
MAX_PEER_ID_LENGTH = 128
ATTEMPTS = 2  # attempt 1: the view from the DHT; attempt 2: the intersection of the views received

# Why a peer is not in the group it would have averaged with (RoundMetrics.left_out)
DECLARED_LATE = "declared late"  # our declaration was stored after the cut-off: we did not vote
NOT_SEEN = "not seen by all members"  # some member's view lacked our declaration (attempt 2 dropped us)
STATE_DIFFERS = "state differs"  # our shared model is not the one the majority of declarers holds
SILENT = "silent at the vote"  # we did not answer in time (attempt 2 of the others dropped us)
NO_AGREEMENT = "no agreement"  # two attempts, still no group every member voted for
MET_EARLIER = "the others met earlier"  # nobody at our meeting, but others declared the round at an earlier one
ALONE = "nobody else declared"  # no group to be in: a round alone


@dataclass(frozen=True)
class Declaration:
    """That a partner averages round `round` (the shared model's round going in) at `meeting`, from the state `hash`:
    stored in the DHT under its own owner-signed subkey as soon as it knows the meeting (its intent), while it still
    trains."""

    peer: str  # its peer id (base58); must be the peer the signing key derives
    round: int
    meeting: float  # the meeting it declares for (a round that failed is met again, at another time)
    hash: str  # its shared model's hash

    FIELDS = ("peer", "round", "meeting", "hash")

    def pack(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def parse(cls, signer: Optional[str], value: Any, round_no: int) -> Optional[Declaration]:
        """A declaration read from the DHT (untrusted): None if malformed, of another round, or not its signer's."""
        if not isinstance(value, dict) or set(value) != set(cls.FIELDS):
            return None
        peer, declared_round, meeting, digest = (value[k] for k in cls.FIELDS)
        if signer is None or peer != signer or declared_round != round_no:
            return None
        if type(meeting) is not float or not math.isfinite(meeting):
            return None
        if not (isinstance(digest, str) and len(digest) <= MAX_HASH_LENGTH):
            return None
        return cls(peer, declared_round, meeting, digest)

    @property
    def state(self) -> PeerState:
        return PeerState(self.round, self.hash)


@dataclass(frozen=True)
class Contribution:
    """What a member's update weighs and measures: its inner steps this round (its weight is
    `screening.weight_for(steps, H)`) and the L2 norm of its whole pseudo-gradient, before encoding. Known when it stops
    training; every status a member sends carries its own, and every reducer screens that member's parts with what it
    told that reducer (no member relays another's)."""

    steps: int = 0
    norm: float = 0.0

    @staticmethod
    def valid(steps: Any, norm: Any) -> bool:
        return is_count(steps) and type(norm) is float and math.isfinite(norm) and 0.0 <= norm <= MAX_NORM


@dataclass(frozen=True)
class Proposal:
    """A set of members for a round, and the group id that names exactly their declarations."""

    members: tuple[str, ...]  # sorted peer ids
    group_id: bytes

    def __contains__(self, peer: object) -> bool:
        return peer in self.members


def group_id(schema: bytes, declarations: Iterable[Declaration]) -> bytes:
    """The id of a group: a hash of the schema and every member's declared entry, sorted by peer id."""
    entries = sorted((d.peer, d.round, d.meeting, d.hash) for d in declarations)
    return hashlib.sha256(msgpack.packb([schema, entries], use_bin_type=True)).digest()[:20]


def propose(schema: bytes, declarations: Mapping[str, Declaration]) -> Proposal:
    """The group a view implies: the declarers holding the state a majority of them hold (ties: see elected_state)."""
    elected = elected_state({peer: d.state for peer, d in declarations.items()})
    chosen = [d for d in declarations.values() if elected is not None and d.state.id == elected]
    return Proposal(tuple(sorted(d.peer for d in chosen)), group_id(schema, chosen))


def met_earlier(
    declared: Mapping[str, Declaration], view: Mapping[str, Declaration], meeting: float, tolerance: float
) -> tuple[str, ...]:
    """The peers to follow instead of voting at `meeting`: nobody else is at our meeting (`view` is us alone), but
    others declared the round for an earlier one (we missed it). Empty: vote. (Following an earlier meeting while
    others are at ours would livelock: a declaration stays in the DHT after its declarer's own meeting failed, so
    peers at later meetings would follow declarations nobody acts on; measured with 16 partners.)"""
    earlier = tuple(sorted(p for p, d in declared.items() if d.meeting < meeting - tolerance))
    return earlier if len(view) == 1 else ()


def ordered(proposal: Proposal) -> list[str]:
    """The members in all-reduce order (member i reduces span i): by hash of the group id and peer id, so no member
    chooses its place by choosing its key."""
    return sorted(proposal.members, key=lambda peer: hashlib.sha256(proposal.group_id + peer.encode()).digest())


@dataclass(frozen=True)
class Lease:
    """How long an attempt-2 vote stands: a member commits on it only while the voter will still be there when the
    commit reaches it, `margin` seconds before the vote's `until` on the swarm clock `now`. (The default has no clock:
    every vote stands.) An attempt-2 voter leaves the round at its deadline; a commit made on its vote after that
    would list a member that has left."""

    now: Callable[[], float] = lambda: -math.inf
    margin: float = 0.0

    def stands(self, until: float) -> bool:
        return self.now() + self.margin < until


Kind = Literal["pending", "vote", "echo", "committed", "out"]
Slot = tuple[int, float]  # (round, meeting): one agreement (a round that failed is met again at another time)


@dataclass(frozen=True)
class Status:
    """What a peer says about its agreement of one round: in its requests (its vote) and in every answer."""

    kind: Kind
    attempt: int = 0
    group_id: bytes = b""  # the group it votes for, or committed
    members: tuple[str, ...] = ()  # that group's members
    view: tuple[str, ...] = ()  # the members of its attempt-1 proposal (what it read from the DHT)
    heard: tuple[str, ...] = ()  # (vote) the members whose vote for that group it holds, itself included
    until: float = math.inf  # (vote) the swarm time until which it stands by the vote (its step's last ask)
    reason: str = ""  # for "out": why (one of the reasons above)
    contribution: Contribution = Contribution()  # the sender's own (vote, echo, committed)

    def pack(self, slot: Slot) -> bytes:
        fields: list[Any] = [*slot, self.kind, self.attempt, self.group_id, list(self.members), list(self.view)]
        fields += [list(self.heard), self.until, self.reason, self.contribution.steps, self.contribution.norm]
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def unpack(cls, raw: bytes) -> Optional[tuple[Slot, Status]]:
        """(slot, status) from untrusted bytes; None if malformed."""
        try:
            fields = msgpack.unpackb(raw, raw=False)
            round_no, meeting, kind, attempt, gid, members, view, heard, until, reason, steps, norm = fields
        except UNPACK_ERRORS:
            return None
        if not (is_count(round_no) and type(meeting) is float and math.isfinite(meeting)):
            return None
        if not (kind in ("pending", "vote", "echo", "committed", "out") and is_count(attempt)):
            return None
        if not (isinstance(gid, bytes) and len(gid) <= 32 and isinstance(reason, str) and len(reason) <= 64):
            return None
        if not (is_peer_list(members) and is_peer_list(view) and is_peer_list(heard)):
            return None
        if type(until) is not float or math.isnan(until):
            return None
        if attempt > ATTEMPTS or (kind in ("vote", "committed") and not (gid and members)):
            return None
        if not Contribution.valid(steps, norm):
            return None
        contribution = Contribution(steps, norm)
        status = cls(kind, attempt, gid, tuple(members), tuple(view), tuple(heard), until, reason, contribution)
        return (round_no, meeting), status


def _peer_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_PEER_ID_LENGTH


def is_peer_list(value: Any) -> bool:
    """A list of peer ids from untrusted input: at most MAX_MEMBERS strings of bounded length."""
    return isinstance(value, list) and len(value) <= MAX_MEMBERS and all(_peer_id(m) for m in value)


PENDING = Status("pending")


@dataclass
class Outcome:
    """How one peer's agreement of a round ended: the group it committed, or why it is out of the round."""

    group: Optional[Proposal]  # the committed group (None: out of the round)
    attempt: int = 1
    reason: str = ""  # why we are out (empty when committed)
    # the members' contributions, as each told us (committed; a member we never heard from directly: none, and our
    # reducer refuses its parts)
    contributions: dict[str, Contribution] = field(default_factory=dict)
    # when we are out: the peers that will hold the state this round ends on (the majority-state declarers we saw)
    others: tuple[str, ...] = ()


class Agreement:
    """One peer's agreement of one round, as a state machine: feed it the statuses peers send (`receive`) and the
    vote deadlines (`deadline_passed`); it says what to send (`status`, to `peers`) and how it ended (`outcome`).

    Attempt 1 votes for our view of the DHT (`first`) and commits once every member voted for it. If that fails, an
    echo step: we read the declarations again (`learn`: a member our first read missed may be one most others saw)
    and wait until every live member has moved on too (each status carries its sender's view). Attempt 2 then votes,
    once, for the live members that a strict majority of the live members' views contain (so a single member's claim
    can drop nobody), and commits once every member of it voted for it. One vote per attempt, none after a commit,
    and a member that voted for our attempt-1 proposal is never dropped as silent (it may have committed it): two
    honest peers never commit two groups that share a member. (A member that tells different peers different things
    can still keep one honest member out of one round; that member then takes the state the round ends on, so no
    split outlives the round.)

    `view` holds every valid declaration this peer read at the cut-off (ours included); `contribution` is ours;
    `abstain` gives the reason we do not vote at all (we declared late), so that we answer "out" to anyone who counts
    on us."""

    def __init__(
        self,
        me: str,
        schema: bytes,
        view: Mapping[str, Declaration],
        contribution: Contribution = Contribution(),
        abstain: str = "",
        lease: Lease = Lease(),
    ) -> None:
        self.me, self.schema, self.contribution, self.lease = me, schema, contribution, lease
        self.contributions: dict[str, Contribution] = {me: contribution}  # each member's, as it told us
        self.view = dict(view)
        self.phase: Literal[1, "echo", 2] = 1
        self.first = propose(schema, self.view)  # our attempt-1 proposal (our view of the DHT)
        self.proposal = self.first  # the one we vote for now
        self.candidates = set(self.first.members)  # who may be in the group: first, and declarers learnt at the echo
        self.learnt = False  # the echo step read the declarations again (`learn`)
        self.views: dict[str, tuple[str, ...]] = {}  # peer -> its attempt-1 proposal's members, as it told us
        self.votes: dict[str, tuple[int, bytes]] = {}  # peer -> (attempt, group id) of its latest vote
        self.latest: dict[str, Status] = {}  # peer -> the latest status it sent us
        self.until = math.inf  # until when we stand by our vote (the network side sets each step's deadline)
        self.committed: dict[str, bytes] = {}  # peer -> the group it says it committed
        self.out: dict[str, str] = {}  # peer -> why it said it is out
        self.silent: set[str] = set()  # members that did not answer by a deadline, even when asked again
        self.equivocating: set[str] = set()  # members that told us two different views
        self.moved_on: set[str] = set()  # peers past attempt 1 (an echo, an attempt-2 vote, a commit, out)
        self.dropped_us: set[str] = set()  # peers whose attempt-2 vote leaves us out (we were silent or late to them)
        self.outcome: Optional[Outcome] = None
        if abstain:
            self._leave(abstain)
        elif me not in self.first:
            self._leave(STATE_DIFFERS)
        elif len(self.first.members) == 1:
            self._leave(ALONE)
        else:
            self.views[me] = self.first.members

    @property
    def attempt(self) -> int:
        return 1 if self.phase == 1 else 2

    # ---- what we say ----

    @property
    def status(self) -> Status:
        first = self.first.members
        ours = self.contribution
        if self.outcome is not None and self.outcome.group is not None:
            group = self.outcome.group
            return Status("committed", self.outcome.attempt, group.group_id, group.members, first, contribution=ours)
        if self.outcome is not None:
            return Status("out", self.attempt, view=first, reason=self.outcome.reason)
        if self.phase == "echo":
            return Status("echo", 2, view=first, contribution=ours)
        proposal = self.proposal
        heard = tuple(p for p in proposal.members if p == self.me or self._voted_for(p, proposal.group_id))
        until = self.until
        return Status("vote", self.attempt, proposal.group_id, proposal.members, first, heard, until, contribution=ours)

    @property
    def peers(self) -> list[str]:
        """Whom we send our status: the members of our attempt-1 proposal other than us (in attempt 2 too: every live
        member's view counts)."""
        return sorted(p for p in self.candidates if p != self.me)

    def missing(self) -> list[str]:
        """Members we still wait for in this step: of our proposal (a vote, or that it holds ours), or every live
        member (an echo)."""
        if self.phase == "echo":
            return [p for p in self._live() if p != self.me and p not in self.moved_on]
        gid = self.proposal.group_id
        waiting = [p for p in self.proposal.members if not self._heard(p) or self._awaits_ours(p, gid)]
        return [p for p in waiting if p != self.me]

    def may_commit(self, group_id: bytes) -> bool:
        """Whether we are undecided and may still commit `group_id`: the group we vote for now, or our attempt-1
        proposal (a member that committed it can still tell us, in any phase). A reducer that receives parts of such a
        group waits for our decision instead of refusing them."""
        return self.outcome is None and group_id in (self.proposal.group_id, self.first.group_id)

    # ---- what we hear ----

    def receive(self, peer: str, status: Status) -> None:
        """A status from `peer` (the sender libp2p authenticated): its vote, echo, commit, or that it is out."""
        if peer == self.me or peer not in self.view:
            return  # only declarers we saw have a say
        if status.view:
            if peer in self.views and self.views[peer] != status.view:
                self.equivocating.add(peer)  # it told us two different views
            self.views.setdefault(peer, status.view)
        self.latest[peer] = status
        if status.kind in ("vote", "echo", "committed"):
            if peer in self.contributions and self.contributions[peer] != status.contribution:
                self.equivocating.add(peer)  # it told us two different contributions
            self.contributions.setdefault(peer, status.contribution)
        if status.kind == "vote":
            self.votes[peer] = (status.attempt, status.group_id)
            if status.attempt > 1 and self.me not in status.members:
                self.dropped_us.add(peer)
        elif status.kind == "committed":
            self.committed[peer] = status.group_id
        elif status.kind == "out":
            self.out[peer] = status.reason
        if status.attempt > 1 or status.kind in ("echo", "committed", "out"):
            self.moved_on.add(peer)
        self.silent.discard(peer)
        self._check()

    def learn(self, declarations: Mapping[str, Declaration]) -> None:
        """Declarations read again at the echo step (valid and signed): a member a majority saw but our first read
        missed can then be in attempt 2. Attempt 2 waits for this."""
        state = self.view[self.me].state if self.me in self.view else None
        for peer, declaration in declarations.items():
            if peer not in self.view and declaration.state == state:
                self.view[peer] = declaration
                self.candidates.add(peer)
        self.learnt = True
        self._check()

    def deadline_passed(self, silent: Sequence[str]) -> None:
        """This step's deadline passed; `silent` did not answer even when asked again. A member that voted for our
        attempt-1 proposal is never taken for silent: it may have committed it, so no group without it may be."""
        if self.outcome is None:
            self.silent.update(p for p in silent if self.votes.get(p, (0, b""))[1] != self.first.group_id)
            self._check(force=True)

    # ---- deciding ----

    def _voted_for(self, peer: str, gid: bytes) -> bool:
        return self.committed.get(peer) == gid or self.votes.get(peer, (0, b""))[1] == gid

    def _supports(self, peer: str) -> bool:
        """Whether `peer` voted for our current proposal (or committed it)."""
        return self._voted_for(peer, self.proposal.group_id)

    def _confirms(self, peer: str) -> bool:
        """Whether `peer` will commit our proposal once it learns that we did: it committed it, or its latest vote is
        for it, says it holds ours, and still stands long enough for our commit to reach it."""
        gid = self.proposal.group_id
        latest = self.latest.get(peer)
        if self.committed.get(peer) == gid:
            return True
        if latest is None or latest.kind != "vote" or latest.group_id != gid or self.me not in latest.heard:
            return False
        # an attempt-1 voter that gives up only moves on to the echo, where a commit of its first proposal still
        # reaches it (`_first_committed_by_a_member`); an attempt-2 voter leaves the round at its deadline
        return latest.attempt < ATTEMPTS or self.lease.stands(latest.until)

    def _awaits_ours(self, peer: str, gid: bytes) -> bool:
        """Whether `peer` still votes for `gid` but has not confirmed it (it must hear our vote, or vote again)."""
        latest = self.latest.get(peer)
        return latest is not None and latest.kind == "vote" and latest.group_id == gid and not self._confirms(peer)

    def _heard(self, peer: str) -> bool:
        """Whether `peer` said anything that counts for this vote: a vote of this attempt or later, moved on, out."""
        voted_now = self.votes.get(peer, (0, b""))[0] >= self.attempt
        return self._supports(peer) or voted_now or peer in self.moved_on

    def _against(self, peer: str) -> bool:
        """Whether `peer` said something that rules our current proposal out."""
        if self._supports(peer):
            return False
        attempt, gid = self.votes.get(peer, (0, b""))
        return peer in self.moved_on or peer in self.equivocating or (attempt >= self.attempt and gid != b"")

    def _ruled_out(self, peer: str) -> bool:
        """Whether `peer` said something final against our current proposal: it is out, committed another group, or
        voted for another group in the last attempt."""
        attempt, gid = self.votes.get(peer, (0, b""))
        other = self.committed.get(peer, self.proposal.group_id) != self.proposal.group_id
        return peer in self.out or other or (attempt == ATTEMPTS and gid != self.proposal.group_id)

    def _gone(self) -> set[str]:
        committed_elsewhere = {p for p, g in self.committed.items() if g != self.first.group_id}
        return set(self.out) | self.silent | self.equivocating | committed_elsewhere

    def _live(self) -> list[str]:
        gone = self._gone()
        return sorted(p for p in self.candidates if p not in gone)

    def _check(self, force: bool = False) -> None:
        if self.outcome is not None:
            return
        if self._first_committed_by_a_member():
            self._commit(self.first, attempt=1)
        elif all(self._confirms(p) for p in self.proposal.members if p != self.me) and self.phase != "echo":
            self._commit(self.proposal, self.attempt)
        elif self.phase == 2 and any(self.committed.get(p) == self.proposal.group_id for p in self.proposal.members):
            self._commit(self.proposal, self.attempt)  # a member held every vote for the group we vote for
        elif self.phase == 1 and (force or (not self.missing() and any(map(self._against, self.proposal.members)))):
            self.phase = "echo"
            self._check()
        elif self.phase == "echo" and self.learnt and (force or not self.missing()):
            self._second_attempt()
        elif self.phase == 2 and (force or any(map(self._ruled_out, self.proposal.members))):
            self._leave(SILENT if self.dropped_us else NO_AGREEMENT)

    def _first_committed_by_a_member(self) -> bool:
        """A member that committed our attempt-1 proposal held every member's vote for it, and never votes again: if
        every attempt-1 vote we hold is for it too (we only missed some) and we did not vote since (or our attempt-2
        proposal contains that member, so it can never be committed), it is the group to take."""
        committers = [p for p, g in self.committed.items() if g == self.first.group_id and p in self.first]
        if not committers or self.equivocating:
            return False
        if any(g != self.first.group_id for a, g in self.votes.values() if a == 1):
            return False
        return self.phase != 2 or any(p in self.proposal for p in committers)

    def _second_attempt(self) -> None:
        """Attempt 2's proposal, computed once: the live members whose declarations a strict majority of the live
        members' views contain (and we hold)."""
        live = set(self._live())
        views = [set(v) for p, v in self.views.items() if p in live]
        seen_by = {p: sum(p in v for v in views) for p in set().union(*views)}
        members = {p for p, n in seen_by.items() if 2 * n > len(views) and p in self.view} - self._gone()
        if self.me not in members:  # most members did not see our declaration
            self._leave(NOT_SEEN)
            return
        if len(members) == 1:
            self._leave(SILENT if self.dropped_us or self.committed else NO_AGREEMENT)
            return
        chosen = tuple(sorted(members))
        self.phase = 2
        self.proposal = Proposal(chosen, group_id(self.schema, [self.view[p] for p in chosen]))
        self._check()

    def _commit(self, proposal: Proposal, attempt: int) -> None:
        contributions = {p: self.contributions[p] for p in proposal.members if p in self.contributions}
        self.outcome = Outcome(proposal, attempt, contributions=contributions)

    def _leave(self, reason: str) -> None:
        others = () if reason == ALONE else tuple(p for p in self.first.members if p != self.me)
        self.outcome = Outcome(None, self.attempt, reason, others=others)
