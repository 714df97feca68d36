"""When a round's agreement starts: a meeting time agreed through the DHT, read in the background.

The first peer of round r to finish its H inner steps proposes `now + window`, rounded up to a whole second on the
swarm's clock (peers that finish within that second propose the same time; one window more in a node's first round,
when partners that just came online start training at their own poll of the peer table), under the round's key (one
subkey per peer); the meeting time is the earliest proposal. Peers still training learn it from a background thread
that reads the key twice a second (once a second after it learnt one: an earlier proposal may land after a later one),
and stop their inner loop `DECLARE_LEAD` seconds before the meeting, so a slower partner contributes fewer inner steps
rather than holding everybody up, and a faster one keeps training until then: its extra steps are progress like any
other. Since a later proposal is always later in time, every peer that reads after the first proposal reached the
replicas it reads agrees on the same minimum. The training loop never waits for the DHT: it reads
`meeting`, a number the thread keeps up to date (on links with a high latency a DHT read takes a second or more).

Most meetings are not raced at all: a group agrees its next meeting inside the round (`Pace`, `agreed_meeting`), and
a fresh run's first meeting is computed by every partner from the time the swarm became ready (`start`). The race
above is what is left: a partner that is not in step with a group (it joined late, or was left out).

At the meeting each peer reads the round's declarations (`comm.voting`): the meeting is the declarations' cut-off.

A node whose update is ready after the meeting passed (it was still settling the previous round, or stalled) goes to
the meeting it missed anyway (`missed`): it declares late, is left out knowing why, and takes the state that meeting's
group reaches, rather than calling a second meeting for the same round (measured with 16 partners on 2 cores: the
members that settled round 1 last called meetings of their own, and round 2 averaged in three groups).

Proposals are untrusted: each is stored under its proposer's owner-signed subkey (in a consortium, members only, see
`security.dht_auth`), and a proposal is used only if it lies between `DECLARE_LEAD / 2` and
`3 * window + PROPOSAL_SLACK` seconds ahead of now (or, as a missed meeting, less than `ahead` seconds past). A
proposal far in the future cannot freeze the swarm, and one in the past cannot break agreement (R1/R2 in the security
review): at worst a member delays one round by three windows. A fake missed meeting (nobody declared there) costs a
node that round's meeting, not its progress: its update stays in its working model and goes out with the next round
(the proposal DoS R3 in the security review, open, is the same cost).

Tuning: `window` must cover one inner step, one poll interval and `DECLARE_LEAD` (a peer stops training one step
early so that its last step ends in time, and the node warns when a step is longer than the window allows); raise it
on links with high DHT latency.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.5  # seconds between DHT reads of the round's proposals (a peer whose clock is ahead sees less time)
KNOWN_POLL_INTERVAL = 1.0  # ... once we know of a meeting (an earlier proposal may still land: DHT replicas lag)
DECLARE_LEAD = 2.0  # seconds before the meeting at which peers stop training and declare their round
MEETING_GRID = 1.0  # seconds: proposals are whole multiples of this on the swarm's clock
PROPOSAL_SLACK = 5.0  # seconds beyond three windows a proposal may lie ahead (clock skew, DHT latency)
MAX_SEEN = 16  # proposals kept, of those passed and of those to come (the earliest of each)
DHT_ERRORS = (OSError, EOFError, RuntimeError, TimeoutError)  # the DHT process is gone, slow or shutting down


@dataclass(frozen=True)
class Pace:
    """When a member can meet for the round after the one it is averaging (what the node hands in with its update):
    `ready`, the swarm time we expect our next H inner steps done (we train meanwhile), or 0; `after`, the seconds of
    training still needed once the round ends (a blocking round); `ahead`, how long after that the meeting is (the
    round window, or more while the DHT is slow; 0: no proposal); `limit`, the most `ahead` the group may take from
    any member (three windows). Each member proposes `at(now)` to its group in its loss report (`comm.losses`) and
    every member computes the same meeting from the proposals (`agreed_meeting`): the group's members learn their
    next meeting from each other, seconds or rounds ahead, instead of racing each other's proposals through the DHT."""

    ready: float = 0.0
    after: float = 0.0
    ahead: float = 0.0
    limit: float = 0.0

    def at(self, now: float) -> Optional[NextMeeting]:
        """Our proposal, made at `now` (swarm time) as our all-reduce ends; None if we make none."""
        if not self.ahead > 0:
            return None
        return NextMeeting(ready=max(self.ready, now + self.after), finished=now, ahead=self.ahead)


@dataclass(frozen=True)
class NextMeeting:
    """A member's proposal for the group's next meeting: when its next H steps are done, when its all-reduce ended,
    and how long after both the meeting should be (all swarm time; untrusted once received: see `agreed_meeting`)."""

    ready: float
    finished: float
    ahead: float


def agreed_meeting(proposals: Sequence[NextMeeting], now: float, limit: float, waited: float = 0.0) -> float:
    """The group's next meeting from its members' proposals (0.0: none): `ahead` (the longest any member asks for, at
    most `limit`) after both the first member's H steps (the first to finish calls the meeting) and the last member's
    end of the all-reduce (each must hold the round's outcome and store its declaration in time). `waited`: how long
    after its end a member may wait for a report that never comes (`comm.losses.REPORT_WAIT`), added when some
    member's proposal is missing (pass it then): the others may still be waiting for it. (An 8-partner soak with
    kills: a member died mid-round, the others waited 12 s for its report and settled after the meeting they had
    agreed on, and the one that had not waited met alone.) Every member that heard the same proposals computes the
    same time. A member claiming to have finished later than `now` (we heard it after it finished) is taken at `now`:
    it cannot push the meeting away; claiming to be ready early can cut a round short, as a DHT proposal can (R3 in
    the security review)."""
    if not proposals:
        return 0.0
    ready = min(p.ready for p in proposals)
    finished = max(min(p.finished, now) for p in proposals) + waited
    ahead = min(max(p.ahead for p in proposals), limit)
    return math.ceil((max(ready, finished) + ahead) / MEETING_GRID) * MEETING_GRID


@dataclass
class RoundSchedule:
    window: float = 4.0  # how long the first finisher waits for the others, in seconds

    def __post_init__(self) -> None:
        if not self.window > DECLARE_LEAD + 0.5:
            raise ValueError(f"round window must be more than {DECLARE_LEAD + 0.5}s, got {self.window}")


class MeetingClock:
    """The agreed start time of one round's agreement, as one peer sees it; a background thread reads the DHT."""

    def __init__(
        self,
        dht: DHT,
        prefix: str,
        round_no: int,
        schedule: RoundSchedule,
        subkey: bytes,
        now: Callable[[], float] = get_dht_time,
        lead: float = DECLARE_LEAD,
        ahead: float = 0.0,
        attended: float = -math.inf,
    ) -> None:
        """`prefix`: the run id and run spec digest (only peers that can average together share meeting times);
        `subkey`: our owner-signed DHT subkey (`security.dht_auth.owner_subkey`); `now`: the swarm's clock
        (`comm.swarm_clock`); `lead`: how long before the meeting we stop training (at least DECLARE_LEAD; more
        when our declarations have been slow to store); `ahead`: how far ahead we call a meeting, if more than the
        window (while the DHT is slow: `comm.voting.Timing.ahead`; at most three windows, the farthest a proposal is
        taken); `attended`: a meeting of this round we already went to (it failed: proposals up to it are spent)."""
        self.dht, self.schedule, self.now, self.lead, self.attended = dht, schedule, now, lead, attended
        self.ahead = min(max(schedule.window, ahead), 3 * schedule.window)
        self.key = f"{prefix}.meet.{round_no}"
        self._subkey = subkey
        self._lock = threading.Lock()
        self._seen: set[float] = set()  # the proposals read so far, from `ahead` seconds ago on
        self._proposal: Optional[float] = None  # ours, if we called the meeting
        self._stored = False
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"meeting-{round_no}", daemon=True)
        self._thread.start()

    @property
    def meeting(self) -> Optional[float]:
        """The meeting time as far as we know: the earliest proposal we can still catch (ours included), or None."""
        now = self.now()
        with self._lock:
            known = [m for m in (*self._seen, self._proposal) if m is not None and m - self.lead / 2 > now]
        return min(known) if known else None

    @property
    def missed(self) -> Optional[float]:
        """The earliest meeting of this round that passed (or is too near to catch) less than `ahead` seconds ago,
        and that we did not attend: the others met there while we were still busy (settling the previous round, a
        stall). A node that has its update ready and no meeting to catch goes to it anyway, declaring late: it is
        left out knowing why and takes the state that meeting's group reaches, instead of calling a meeting of its
        own for a round the others already average (a second, smaller group of the same round splits the swarm)."""
        now = self.now()
        with self._lock:
            passed = [m for m in self._seen if now - self.ahead <= m <= now + self.lead / 2 and m > self.attended]
        return min(passed) if passed else None

    def propose(self, first: bool = False) -> None:
        """We finished our H steps and know of no meeting we can catch: call it for `now + window` (or `ahead`, while
        the DHT is slow), rounded up to a whole MEETING_GRID on the swarm's clock, so that partners finishing within
        one grid step propose the very same time even before they see each other's proposal (stored in the
        background; the earliest wins). `first`: our first round since we joined: one window later still, for
        partners that started training up to a window after us (each saw the last of --min-peers come online at its
        own poll) to make it."""
        window = self.schedule.window
        earliest = self.now() + max(self.ahead, self.lead + 1.0) + (window if first else 0.0)
        with self._lock:
            self._proposal, self._stored = math.ceil(earliest / MEETING_GRID) * MEETING_GRID, False
        self._wake.set()

    def start(self, ready: float) -> None:
        """Round 1 of a fresh run: meet three windows after the swarm became ready (`session.wait_for_trainers`: the
        last of --min-peers trainers ready, from their signed status records), the farthest ahead a meeting is called
        (`Timing.ahead`): the last partner's record must be stored and read by every other, and each of their
        declarations stored, before the cut-off. Every partner computes the same time from the same records and
        knows it the moment it starts training, so it declares at once, rather than racing the first finisher's
        proposal through a DHT that partners starting together load most (16 partners on 2 cores: proposals 30 s
        apart, declarations stored 11 s late, round 1 in five groups, and the swarm never came together in that
        run). Ignored if it passed (we are late: we propose, or follow the meeting we missed) or lies farther ahead
        than a proposal is taken (a forged `ready`); stored like our proposal, so that peers which read other records
        learn it too."""
        meeting = math.ceil((ready + 3 * self.schedule.window) / MEETING_GRID) * MEETING_GRID
        now = self.now()
        if now + self.lead / 2 < meeting <= now + 3 * self.schedule.window + PROPOSAL_SLACK:
            self.agree(meeting)

    def agree(self, meeting: float) -> None:
        """The meeting our last round's group agreed on for this round (`Pace`): our proposal, unless ours is
        earlier; stored in the background, so that peers outside that group learn it too."""
        with self._lock:
            if self._proposal is None or meeting < self._proposal:
                self._proposal, self._stored = meeting, False
        self._wake.set()

    def should_stop_training(self, step_seconds: float = 0.0) -> bool:
        """True from shortly before a catchable meeting, or earlier by one inner step (`step_seconds`) so that a step
        started now ends in time."""
        meeting = self.meeting
        return meeting is not None and meeting - self.lead - 0.25 <= self.now() + step_seconds

    def close(self) -> None:
        self._closed.set()
        self._wake.set()

    # ---- the background thread ----

    def _loop(self) -> None:
        """Read the proposals until the clock is closed (the node stops training for the meeting): every POLL_INTERVAL
        while we know of no meeting, every KNOWN_POLL_INTERVAL after, and at once after storing ours. A peer must keep
        reading after it first learns a meeting: under load a proposal made a second earlier can reach the replicas
        we read after a later one, and a peer that stopped reading met alone for the later one (the swarm split)."""
        read_at = -KNOWN_POLL_INTERVAL
        while not self._closed.is_set():
            try:
                stored = self._store_proposal()
                interval = POLL_INTERVAL if self.meeting is None else KNOWN_POLL_INTERVAL
                if stored or time.monotonic() - read_at >= interval - 1e-3:
                    read_at = time.monotonic()
                    seen = self._read()
                    with self._lock:
                        self._seen = self._kept(self._seen | seen)
            except DHT_ERRORS as e:
                logger.debug("meeting clock: DHT unavailable (%r)", e)
            self._wake.wait(POLL_INTERVAL)
            self._wake.clear()

    def _kept(self, seen: set[float]) -> set[float]:
        """The proposals worth keeping: the earliest MAX_SEEN of those passed (from `ahead` seconds ago on, later than
        the meeting we attended) and of those to come (only the earliest of each is ever used; a member with many
        keys cannot grow the set)."""
        now = self.now()
        passed = sorted(m for m in seen if now - self.ahead <= m <= now + self.lead / 2 and m > self.attended)
        coming = sorted(m for m in seen if m > now + self.lead / 2)
        return set(passed[:MAX_SEEN]) | set(coming[:MAX_SEEN])

    def _store_proposal(self) -> bool:
        """Store our proposal if there is a new one; whether we did."""
        with self._lock:
            proposal = None if self._stored else self._proposal
            self._stored = True
        if proposal is not None:
            self.dht.store(self.key, proposal, expiration_time=proposal + 600, subkey=self._subkey)
        return proposal is not None

    def _read(self) -> set[float]:
        """The proposals in the DHT that lie between `ahead` seconds ago and the farthest we take one (untrusted: only
        finite numbers in that window count, one per signed subkey)."""
        found = self.dht.get(self.key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return set()
        now = self.now()
        earliest, latest = now - self.ahead, now + 3 * self.schedule.window + PROPOSAL_SLACK
        return {
            float(v.value)
            for v in found.value.values()
            if type(v.value) in (int, float) and math.isfinite(v.value) and earliest <= v.value <= latest
        }
