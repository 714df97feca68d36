"""The agreed group (comm/agreement.py) on a fake network: views that differ, silent and abstaining members, a late
commit, malformed statuses. Each peer runs its own `Agreement`; `Net` delivers what each sends, in order, except what
a test holds back or drops."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from tapestry_p2p.comm.agreement import (
    ALONE,
    DECLARED_LATE,
    NO_AGREEMENT,
    NOT_SEEN,
    SILENT,
    STATE_DIFFERS,
    Agreement,
    Contribution,
    Declaration,
    Lease,
    Status,
    group_id,
    met_earlier,
    ordered,
    propose,
)

SCHEMA = b"schema"


def decl(peer: str, digest: str = "h", round_no: int = 4, meeting: float = 1000.0) -> Declaration:
    return Declaration(peer, round_no, meeting, digest)


class Net:
    """Peers exchanging statuses: each vote is a request, answered at once with the receiver's status (as
    `rpc_agree` does); `cut` holds the messages between two peers back until `heal`."""

    def __init__(self, agreements: dict[str, Agreement], dht: dict[str, Declaration] | None = None) -> None:
        self.peers = agreements
        self.dht = dht or {}  # what a peer entering the echo step reads again (default: nothing more)
        self.cut: set[tuple[str, str]] = set()
        self.held: list[tuple[str, str]] = []
        self.lies: dict[str, dict[str, Status]] = {}  # liar -> receiver -> what it tells that receiver

    def status(self, sender: str, receiver: str) -> Status:
        return self.lies.get(sender, {}).get(receiver, self.peers[sender].status)

    def send(self, sender: str, receiver: str) -> None:
        if (sender, receiver) in self.cut:
            self.held.append((sender, receiver))
            return
        if receiver not in self.peers:
            return
        self.peers[receiver].receive(sender, self.status(sender, receiver))  # the request
        self.peers[sender].receive(receiver, self.status(receiver, sender))  # the answer
        for name in (sender, receiver):
            agreement = self.peers[name]
            if agreement.phase == "echo" and not agreement.learnt:
                agreement.learn(self.dht)

    def run(self, rounds: int = 4) -> None:
        """Everyone sends its status to every member of its proposal, until nothing changes."""
        for _ in range(rounds):
            for name, agreement in self.peers.items():
                for peer in agreement.peers if agreement.outcome is None else agreement.first.members:
                    if peer != name:
                        self.send(name, peer)

    def outcomes(self) -> dict[str, tuple]:
        return {name: _summary(a) for name, a in self.peers.items()}


def _summary(agreement: Agreement) -> tuple | None:
    outcome = agreement.outcome
    return None if outcome is None else (outcome.group.members if outcome.group else None, outcome.reason)


def swarm(views: dict[str, list[Declaration]], dht: list[Declaration] = ()) -> Net:
    agreements = {name: Agreement(name, SCHEMA, {d.peer: d for d in view}) for name, view in views.items()}
    return Net(agreements, {d.peer: d for d in dht})


def test_everyone_seeing_the_same_declarations_commits_one_group_at_once():
    everyone = [decl(p) for p in "abc"]
    net = swarm({p: everyone for p in "abc"})
    net.run(rounds=1)
    assert net.outcomes() == {p: (("a", "b", "c"), "") for p in "abc"}
    gids = {a.outcome.group.group_id for a in net.peers.values()}
    assert gids == {group_id(SCHEMA, everyone)}
    assert all(a.outcome.attempt == 1 for a in net.peers.values())


def test_the_group_id_names_every_declared_entry():
    base = [decl("a"), decl("b")]
    assert group_id(SCHEMA, base) == group_id(SCHEMA, list(reversed(base)))
    assert group_id(SCHEMA, base) != group_id(SCHEMA, [decl("a"), decl("b", meeting=1001.0)])  # another meeting
    assert group_id(SCHEMA, base) != group_id(b"other", base)
    proposal = propose(SCHEMA, {d.peer: d for d in base})
    assert sorted(ordered(proposal)) == ["a", "b"]


def test_a_declaration_seen_by_a_minority_only_is_dropped_at_the_second_attempt():
    everyone = [decl(p) for p in "abcd"]
    net = swarm({"a": everyone, "b": everyone[:3], "c": everyone[:3], "d": everyone})  # only a and d saw d
    net.run()
    outcomes = net.outcomes()
    assert outcomes["a"] == outcomes["b"] == outcomes["c"] == (("a", "b", "c"), "")
    assert outcomes["d"] == (None, NOT_SEEN)  # d knows why
    assert net.peers["a"].outcome.attempt == 2
    assert set(net.peers["d"].outcome.others) == {"a", "b", "c"}  # who will hold the round's outcome


def test_a_declaration_our_first_read_missed_is_learnt_at_the_echo():
    everyone = [decl(p) for p in "abc"]
    net = swarm({"a": everyone, "b": everyone[:2], "c": everyone}, dht=everyone)  # b's first read missed c
    net.run()
    assert net.outcomes() == {p: (("a", "b", "c"), "") for p in "abc"}


def test_a_minority_state_is_left_out_and_told_whom_to_follow():
    view = [decl("a", "h1"), decl("b", "h1"), decl("c", "h2")]
    net = swarm({p: view for p in "abc"})
    net.run()
    assert net.outcomes()["a"] == (("a", "b"), "")
    assert net.outcomes()["c"] == (None, STATE_DIFFERS)
    assert set(net.peers["c"].outcome.others) == {"a", "b"}


def test_a_silent_member_is_dropped_after_the_deadline():
    everyone = [decl(p) for p in "abc"]
    net = swarm({p: everyone for p in "abc"})
    net.cut = {("c", "a"), ("c", "b"), ("a", "c"), ("b", "c")}  # c is stalled: it neither sends nor answers
    net.run()
    assert all(a.outcome is None for a in net.peers.values())  # nobody commits without c's vote
    for name in "ab":
        net.peers[name].deadline_passed(silent=net.peers[name].missing())
    net.run()
    assert net.outcomes()["a"] == net.outcomes()["b"] == (("a", "b"), "")
    assert net.peers["c"].outcome is None  # c, stalled, has decided nothing yet
    net.cut.clear()  # c resumes: its vote for {a, b, c} is answered with their commit of {a, b}, without it
    net.run()
    assert net.outcomes()["c"] == (None, SILENT)


def test_a_member_that_misses_one_vote_commits_through_a_groupmates_commit():
    everyone = [decl(p) for p in "abc"]
    net = swarm({p: everyone for p in "abc"})
    net.cut = {("b", "c"), ("c", "b")}  # b and c never hear from each other directly
    net.send("a", "b")
    net.send("a", "c")  # a now holds every vote, and commits; b and c hold a's vote only
    assert net.outcomes() == {"a": (("a", "b", "c"), ""), "b": None, "c": None}
    net.send("b", "a")  # a's answers tell them it committed: so everyone voted for that group
    net.send("c", "a")
    assert net.outcomes() == {p: (("a", "b", "c"), "") for p in "abc"}


def test_a_commit_learnt_after_moving_on_is_taken_when_it_rules_out_our_second_proposal():
    everyone = [decl(p) for p in "abc"]
    net = swarm({p: everyone for p in "abc"})
    net.cut = {("c", "b"), ("b", "c")}
    net.send("a", "b")
    net.send("a", "c")  # a holds all three votes: a commits {a, b, c}; b never heard c, c never heard b
    c = net.peers["c"]
    c.deadline_passed(silent=["b"])  # c gives up on attempt 1 and echoes what it saw, to move on without b ...
    assert c.outcome is None and c.phase == "echo"
    net.send("c", "a")  # ... but a committed {a, b, c}, for which c holds every vote it heard: c commits it too
    assert net.outcomes()["c"] == (("a", "b", "c"), "")


def test_two_failed_attempts_leave_everyone_out_knowing_why():
    everyone = [decl(p) for p in "abcd"]
    net = swarm({"a": everyone, "b": everyone[:3], "c": everyone, "d": [everyone[0], everyone[3]]})
    net.run(rounds=8)
    for agreement in net.peers.values():
        if agreement.outcome is None:
            agreement.deadline_passed(silent=agreement.missing())
    net.run(rounds=8)
    groups = {a.outcome.group.group_id for a in net.peers.values() if a.outcome and a.outcome.group}
    members = [a.outcome.group.members for a in net.peers.values() if a.outcome and a.outcome.group]
    assert len(groups) <= 1  # never two groups
    for agreement in net.peers.values():
        if agreement.outcome.group is None:
            assert agreement.outcome.reason in (NOT_SEEN, SILENT, NO_AGREEMENT), agreement.outcome
        else:
            assert all(agreement.outcome.group.members == m for m in members)


def vote_for(members: str, view: str) -> Status:
    proposal = propose(SCHEMA, {p: decl(p) for p in members})
    return Status("vote", 1, proposal.group_id, proposal.members, tuple(sorted(view)))


def test_a_member_telling_each_peer_another_view_costs_the_round_never_a_split():
    everyone = [decl(p) for p in "abl"]
    net = swarm({p: everyone for p in "abl"})
    # l tells a that it saw only {a, l}, and b that it saw only {b, l}: as one view of three, it drops nobody
    net.lies["l"] = {"a": vote_for("al", "al"), "b": vote_for("bl", "bl")}
    net.run()
    for agreement in net.peers.values():
        if agreement.outcome is None:
            agreement.deadline_passed(silent=agreement.missing())
    net.run()
    for name in "ab":
        if net.peers[name].outcome is None:
            net.peers[name].deadline_passed(silent=[])
    # l never echoes, so it is dropped as silent; had it echoed, it would have stayed in the majority's group and,
    # never voting for it, left the round without a group: either way the honest two decide alike
    assert net.outcomes()["a"] == net.outcomes()["b"] == (("a", "b"), "")


def test_a_member_voting_differently_to_each_peer_leaves_one_honest_peer_out_for_one_round():
    """What one lying member can still do (no protocol of unsigned votes among three can prevent it): a commits the
    round's group with the liar's vote, b never gets that vote and ends out of the round, knowing whom to follow. b
    then takes the state the round ends on: no split outlives the round."""
    everyone = [decl(p) for p in "abl"]
    net = swarm({p: everyone for p in "abl"})
    honest_vote = net.peers["l"].status
    net.lies["l"] = {"a": dataclasses.replace(honest_vote, heard=("a", "b", "l")), "b": vote_for("bl", "abl")}
    net.send("l", "a")  # a holds the liar's vote for the round's group (that says it holds everyone's),
    net.send("a", "b")  # and b's: a commits
    net.send("l", "b")  # b holds the liar's vote for another group, and waits to hear that a holds its vote
    assert net.outcomes()["a"] == (("a", "b", "l"), "") and net.peers["b"].missing() == ["a"]
    net.send("b", "a")  # a answers that it committed, but the liar voted otherwise: b moves on to the echo
    assert net.peers["b"].phase == "echo"
    for _ in range(2):  # the liar never echoes: b's deadlines pass
        net.run()
        for agreement in net.peers.values():
            if agreement.outcome is None:
                agreement.deadline_passed(silent=agreement.missing())
    b = net.peers["b"].outcome
    assert b.group is None and "a" in b.others


def test_a_late_declarer_abstains_and_says_so():
    everyone = [decl(p) for p in "abc"]
    agreements = {p: Agreement(p, SCHEMA, {d.peer: d for d in everyone}) for p in "ab"}
    agreements["c"] = Agreement("c", SCHEMA, {d.peer: d for d in everyone}, abstain=DECLARED_LATE)
    net = Net(agreements)
    net.run()
    assert net.outcomes() == {"a": (("a", "b"), ""), "b": (("a", "b"), ""), "c": (None, DECLARED_LATE)}


def test_alone_when_nobody_else_declared():
    agreement = Agreement("a", SCHEMA, {"a": decl("a")})
    assert agreement.outcome.group is None and agreement.outcome.reason == ALONE and agreement.outcome.others == ()


def test_a_peer_alone_at_a_later_meeting_follows_the_earlier_one_and_a_group_there_votes():
    early = {p: decl(p, meeting=1000.0) for p in "abcde"}
    late = {p: decl(p, meeting=1001.0) for p in "xyz"}
    assert met_earlier(early | late, late, 1001.0, 1e-3) == ()  # (declarations outlive failed meetings: no following)
    assert met_earlier(early, early, 1000.0, 1e-3) == ()
    assert met_earlier(early | {"x": late["x"]}, {"x": late["x"]}, 1001.0, 1e-3) == tuple("abcde")


def test_statuses_from_peers_we_did_not_see_or_about_other_groups_are_ignored():
    everyone = [decl(p) for p in "ab"]
    a = Agreement("a", SCHEMA, {d.peer: d for d in everyone})
    a.receive("mallory", Status("committed", 1, b"x" * 20, ("a", "mallory"), ("a", "mallory")))
    assert a.outcome is None
    a.receive("b", Status("vote", 1, a.proposal.group_id, a.proposal.members, a.proposal.members, ("a", "b")))
    assert a.outcome.group == a.first


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        Status("vote", 1, b"g", ("a",)).pack((1, 2.0))[:-1],
        msgpack.packb([1, 2.0, "vote", 3, b"g", ["a"], [], [], 9.0, "", 1, 1.0]),  # attempt beyond the last
        msgpack.packb([1, 2.0, "vote", 1, b"", ["a"], [], [], 9.0, "", 1, 1.0]),  # a vote for no group
        msgpack.packb([1, 2.0, "shout", 1, b"g", ["a"], [], [], 9.0, "", 1, 1.0]),
        msgpack.packb([1, 2.0, "vote", 1, b"g", ["a" * 500], [], [], 9.0, "", 1, 1.0]),
        msgpack.packb([1, 2.0, "vote", 1, b"g", ["a"] * 1000, [], [], 9.0, "", 1, 1.0]),
        msgpack.packb([True, 2.0, "vote", 1, b"g", ["a"], [], [], 9.0, "", 1, 1.0]),
        msgpack.packb([1, float("nan"), "vote", 1, b"g", ["a"], [], [], 9.0, "", 1, 1.0]),
        msgpack.packb([1, 2, "vote", 1, b"g", ["a"], [], [], 9.0, "", 1, 1.0]),  # the meeting as an int
        msgpack.packb([1, 2.0, "vote", 1, b"g", ["a"], [], [], 9.0, "", -1, 1.0]),  # negative steps
        msgpack.packb([1, 2.0, "vote", 1, b"g", ["a"], [], [], 9.0, "", 1, float("inf")]),  # a norm that is no number
        msgpack.packb([1, 2.0, "vote", 1, b"g", ["a"], [], [], 9.0, "", 1, 1]),  # the norm as an int
        msgpack.packb([1, 2.0, "vote", 1, b"g", ["a"], [], [], 9.0, ""]),  # no contribution
        msgpack.packb([1, 2.0, "vote", 1, b"g", ["a"], [], [], float("nan"), "", 1, 1.0]),  # a lease that is no time
        msgpack.packb([1, 2.0, "vote", 1, b"g", ["a"], [], [], 9, "", 1, 1.0]),  # the lease as an int
        msgpack.packb([1, 2.0, "vote", 1, b"g", ["a"], [], ["a"] * 1000, 9.0, "", 1, 1.0]),  # too many heard
    ],
)
def test_malformed_statuses_are_refused(raw):
    assert Status.unpack(raw) is None


def test_a_status_round_trips():
    status = Status("vote", 2, b"g" * 20, ("a", "b"), ("a", "b", "c"), ("a",), 1003.5, "", Contribution(7, 0.5))
    assert Status.unpack(status.pack((7, 1000.5))) == ((7, 1000.5), status)


GOOD = {"peer": "a", "round": 4, "meeting": 1000.0, "hash": "h"}


@pytest.mark.parametrize(
    "value",
    [
        {**GOOD, "peer": "b"},  # speaks for another peer than its signer
        {**GOOD, "round": 5},  # another round
        {**GOOD, "meeting": 1000},  # an int, not a float
        {**GOOD, "meeting": float("inf")},
        {**GOOD, "hash": "h" * 65},
        {**GOOD, "extra": 0},
        {k: v for k, v in GOOD.items() if k != "meeting"},
        "not a dict",
    ],
)
def test_malformed_declarations_are_refused(value):
    assert Declaration.parse("a", value, 4) is None


def test_a_declaration_round_trips():
    d = decl("a")
    assert Declaration.parse("a", d.pack(), 4) == d


@pytest.mark.parametrize("seed", range(300))
def test_no_two_committed_groups_share_a_member_whatever_the_order_and_deadlines(seed):
    """Random views (each peer may miss others' declarations), random delivery order, random deadlines: a peer that
    commits a group is never in another committed group, and every member of a committed group that decides at all
    commits the same group."""
    import random

    rng = random.Random(seed)
    names = "abcdef"[: rng.randint(2, 6)]
    everyone = {p: decl(p) for p in names}
    views = {p: [everyone[q] for q in names if q == p or rng.random() > 0.15] for p in names}
    net = swarm(views, dht=list(everyone.values()) if rng.random() < 0.5 else [])
    queue = [(name, peer) for name, a in net.peers.items() for peer in a.peers]
    for _ in range(400):
        if rng.random() < 0.1:  # a deadline passes somewhere
            name = rng.choice(names)
            agreement = net.peers[name]
            agreement.deadline_passed(silent=[p for p in agreement.missing() if rng.random() < 0.5])
        elif queue:
            sender, receiver = queue.pop(rng.randrange(len(queue)))
            before = net.peers[sender].status, net.peers[receiver].status
            net.send(sender, receiver)
            for name in (sender, receiver):  # a changed status is sent again to the proposal's members
                if net.peers[name].status not in before:
                    queue += [(name, p) for p in net.peers[name].first.members if p != name]
    committed = {n: a.outcome.group for n, a in net.peers.items() if a.outcome and a.outcome.group}
    for name, group in committed.items():
        assert name in group.members
        for other, theirs in committed.items():
            if other in group.members:
                assert theirs == group, (seed, name, group, other, theirs)


@pytest.mark.parametrize("seed", range(300))
def test_one_lying_member_never_puts_two_honest_peers_in_different_committed_groups(seed):
    """A member that tells every peer, at every exchange, a random vote, commit, echo or view: honest peers that both
    commit a group never commit different ones (the liar can keep one out of a round: see above)."""
    import itertools
    import random

    rng = random.Random(seed)
    honest = "abcde"[: rng.randint(2, 5)]
    names = honest + "l"
    everyone = {p: decl(p) for p in names}
    net = swarm({p: list(everyone.values()) for p in names}, dht=list(everyone.values()))
    subsets = [c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k) if "l" in c]

    def lie() -> Status:
        members = rng.choice(subsets)
        gid = propose(SCHEMA, {p: everyone[p] for p in members}).group_id
        kind = rng.choice(["vote", "vote", "committed", "echo", "out"])
        view = tuple(sorted(rng.choice(subsets)))
        return Status(kind, rng.choice([1, 2]), gid, members, view, "lie")

    class Lying(dict):
        def get(self, receiver, default=None):
            return lie()

    net.lies["l"] = Lying()
    queue = [(name, peer) for name in honest for peer in net.peers[name].peers]
    for _ in range(300):
        if rng.random() < 0.1:
            name = rng.choice(honest)
            agreement = net.peers[name]
            agreement.deadline_passed(silent=[p for p in agreement.missing() if rng.random() < 0.5])
        elif queue:
            sender, receiver = queue.pop(rng.randrange(len(queue)))
            net.send(sender, receiver)
            queue += [(sender, receiver)] if rng.random() < 0.5 else []
            queue += [("l", rng.choice(honest))] if rng.random() < 0.3 else []
    committed = {n: net.peers[n].outcome.group for n in honest if net.peers[n].outcome and net.peers[n].outcome.group}
    for name, group in committed.items():
        for other, theirs in committed.items():
            if other in group.members:
                assert theirs == group, (seed, name, group, other, theirs)


def test_each_members_contribution_is_what_it_told_us_and_two_different_ones_expose_it():
    everyone = [decl(p) for p in "abc"]
    agreements = {
        p: Agreement(p, SCHEMA, {d.peer: d for d in everyone}, Contribution(10 + i, 1.0 + i))
        for i, p in enumerate("abc")
    }
    net = Net(agreements)
    net.run()
    outcome = net.peers["a"].outcome
    assert outcome.contributions == {"a": Contribution(10, 1.0), "b": Contribution(11, 2.0), "c": Contribution(12, 3.0)}
    liar = Agreement("a", SCHEMA, {d.peer: d for d in everyone})
    vote = net.peers["b"].status
    liar.receive("b", vote)
    liar.receive(
        "b", Status(vote.kind, vote.attempt, vote.group_id, vote.members, vote.view, contribution=Contribution(1, 1e9))
    )
    assert "b" in liar.equivocating


def test_a_member_committing_through_a_commit_lacks_the_contributions_it_never_heard():
    """What the network side then asks for before its all-reduce (comm.voting): the outcome names only the
    contributions this peer was told directly."""
    everyone = [decl(p) for p in "abc"]
    net = swarm({p: everyone for p in "abc"})
    net.cut = {("b", "c"), ("c", "b")}
    net.send("a", "b")
    net.send("a", "c")  # a commits
    net.send("c", "a")  # c learns a's commit: it commits without ever hearing b
    assert net.outcomes()["c"] == (("a", "b", "c"), "")
    assert set(net.peers["c"].outcome.contributions) == {"a", "c"}


def test_a_peer_past_attempt_1_may_still_commit_its_first_proposal_and_its_reducer_waits_for_it():
    view = {p: decl(p) for p in "abc"}
    agreement = Agreement("a", SCHEMA, view)
    first = agreement.first.group_id
    agreement.deadline_passed(["b", "c"])  # nobody answered: on to the echo step
    assert agreement.phase == "echo" and agreement.may_commit(first)  # b or c may have committed it: it tells us
    other = propose(SCHEMA, {p: view[p] for p in "ab"}).group_id
    assert not agreement.may_commit(other)  # (parts of a group we never proposed are refused at once)
    agreement.receive("b", Status("committed", 1, first, agreement.first.members, agreement.first.members))
    assert agreement.outcome is not None and agreement.outcome.group == agreement.first
    assert not agreement.may_commit(first)  # decided


def test_votes_held_from_members_that_gave_up_before_ours_reached_them_commit_nothing():
    """Seen in the 8-partner soak (round 128): a member killed before the meeting kept c at attempt 1 while a and b
    voted attempt 2 for {a, b, c}, waited a window for c's vote, and left. c then proposed {a, b, c} too, held both
    their votes, and committed a group whose other members were out. A vote counts only if it says it holds ours."""
    everyone = [decl(p) for p in "abcd"]
    net = swarm({p: everyone for p in "abcd"})
    net.cut = {(x, "d") for x in "abc"} | {("d", x) for x in "abc"}  # d was killed after declaring
    net.run(rounds=1)
    a, b, c = (net.peers[p] for p in "abc")
    for agreement in (a, b):  # a and b give up on attempt 1 and on c's echo; c is still at attempt 1
        agreement.deadline_passed(silent=agreement.missing())
        agreement.learn({})
        agreement.deadline_passed(silent=agreement.missing())
        assert agreement.phase == 2 and agreement.proposal.members == ("a", "b", "c")
    net.send("a", "b")
    net.send("a", "c")
    net.send("b", "c")  # c holds both attempt-2 votes, neither of which says it holds c's
    for agreement in (a, b):
        agreement.deadline_passed(silent=agreement.missing())
    assert net.outcomes()["a"] == net.outcomes()["b"] == (None, NO_AGREEMENT)
    c.deadline_passed(silent=["d"])
    c.learn({})
    assert c.phase == 2 and c.proposal.members == ("a", "b", "c") and c.outcome is None  # it does not commit
    net.send("c", "a")  # a answers that it is out: c leaves at once, knowing why
    assert net.outcomes()["c"] == (None, NO_AGREEMENT)


@pytest.mark.parametrize("seed", range(300))
def test_a_committed_group_is_never_one_sided_when_every_member_hears_the_commit(seed):
    """Random views and delivery order on a clock: each step's deadline a window after it starts, a vote standing
    until then, and every commit reaching every member at once (as `comm.voting` announces it). Every member of a
    committed group commits it; none has left the round."""
    import random

    rng = random.Random(seed)
    names = "abcdef"[: rng.randint(2, 6)]
    everyone = {p: decl(p) for p in names}
    now = [0.0]
    lease = Lease(lambda: now[0])
    agreements = {
        p: Agreement(p, SCHEMA, {q: everyone[q] for q in names if q == p or rng.random() > 0.15}, lease=lease)
        for p in names
    }
    net = Net(agreements, everyone if rng.random() < 0.5 else {})
    steps: dict[str, object] = {}
    queue = [(name, peer) for name, a in net.peers.items() for peer in a.peers]
    announced: set[str] = set()
    for _ in range(600):
        now[0] += 1.0
        for name, agreement in net.peers.items():  # a new step: its deadline is a window away
            if steps.get(name) != agreement.phase:
                steps[name], agreement.until = agreement.phase, now[0] + rng.randint(5, 40)
        due = [n for n, a in net.peers.items() if a.outcome is None and a.until <= now[0]]
        if due and rng.random() < 0.2:
            agreement = net.peers[rng.choice(due)]
            agreement.deadline_passed(silent=[p for p in agreement.missing() if rng.random() < 0.5])
        elif queue and rng.random() < 0.7:
            sender, receiver = queue.pop(rng.randrange(len(queue)))
            before = net.peers[sender].status, net.peers[receiver].status
            net.send(sender, receiver)
            for name in (sender, receiver):
                if net.peers[name].status not in before:
                    queue += [(name, p) for p in net.peers[name].first.members if p != name]
        for name, agreement in net.peers.items():  # a commit is announced to its members at once
            if agreement.outcome and agreement.outcome.group and name not in announced:
                announced.add(name)
                for peer in agreement.outcome.group.members:
                    if peer != name:
                        net.send(name, peer)
    for name, agreement in net.peers.items():
        if agreement.outcome and agreement.outcome.group:
            for member in agreement.outcome.group.members:
                theirs = net.peers[member].outcome
                assert theirs is None or theirs.group == agreement.outcome.group, (seed, name, member, theirs)
