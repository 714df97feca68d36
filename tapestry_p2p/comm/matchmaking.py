"""When a round's all-reduce starts: a meeting time agreed through the DHT, instead of spinning in matchmaking.

(hivemind's own matchmaking then forms the group in the last MATCHMAKING_LEAD seconds; its leader queue is
rate-limited by `p2p.hivemind_compat`.)

The first peer of round r to finish its H inner steps proposes `now + window` under the round's key (one subkey per
peer); the meeting time is the earliest proposal. Peers still training poll the key about once a second and stop
their inner loop `lead` seconds before the meeting, so a slower partner contributes fewer inner steps rather than
holding everybody up, and a faster one waits at most `window` seconds. Since a later proposal is always later in
time, every peer that reads after the first proposal landed agrees on the same minimum.

Proposals are untrusted: each is stored under its proposer's owner-signed subkey (in a consortium, members only, see
`security.dht_auth`), and a proposal is used only if it lies between `lead / 2` and `window + PROPOSAL_SLACK` seconds
ahead of now. A proposal far in the future cannot freeze the swarm, and one in the past cannot break agreement
(R1/R2 in the security review): at worst a member delays one round by one window.

Tuning: `window` must cover one inner step, one poll interval and `lead` (hivemind needs about `lead` seconds of
matchmaking before the all-reduce starts; a peer stops training one step early so that its last step ends in time,
and the node warns when a step is longer than the window allows); raise it on links with high DHT latency.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between DHT reads while training
MATCHMAKING_LEAD = 2.0  # seconds before the meeting at which peers enter hivemind's matchmaking
PROPOSAL_SLACK = 5.0  # seconds beyond `window` a proposal may lie ahead (clock skew, DHT latency)


@dataclass
class RoundSchedule:
    window: float = 4.0  # how long the first finisher waits for the others, in seconds

    def __post_init__(self) -> None:
        if not self.window > MATCHMAKING_LEAD + 0.5:
            raise ValueError(f"round window must be more than {MATCHMAKING_LEAD + 0.5}s, got {self.window}")


class MeetingClock:
    """The agreed start time of one round's all-reduce, as seen by one peer."""

    def __init__(self, dht: DHT, prefix: str, round_no: int, schedule: RoundSchedule, subkey: bytes) -> None:
        """`prefix`: the run id and run spec digest (only peers that can average together share meeting times);
        `subkey`: our owner-signed DHT subkey (`security.dht_auth.owner_subkey`)."""
        self.dht, self.schedule = dht, schedule
        self.key = f"{prefix}.meet.{round_no}"
        self._subkey = subkey
        self._meeting: Optional[float] = None
        self._last_poll = -math.inf

    def _read(self) -> Optional[float]:
        found = self.dht.get(self.key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return None
        now = get_dht_time()
        earliest, latest = now + MATCHMAKING_LEAD / 2, now + self.schedule.window + PROPOSAL_SLACK
        times = [
            v.value
            for v in found.value.values()
            if type(v.value) in (int, float) and math.isfinite(v.value) and earliest <= v.value <= latest
        ]  # untrusted: only finite numbers in the catchable window count
        return min(times) if times else None

    def poll(self) -> Optional[float]:
        """The meeting time if someone proposed one (reads the DHT at most once per POLL_INTERVAL)."""
        if self._meeting is None and time.monotonic() - self._last_poll >= POLL_INTERVAL:
            self._last_poll = time.monotonic()
            self._meeting = self._read()
        return self._meeting

    def should_stop_training(self, step_seconds: float = 0.0) -> bool:
        """True from shortly before a catchable meeting, or earlier by one inner step (`step_seconds`) so that a step
        started now ends in time; a meeting we can no longer catch is ignored."""
        meeting = self.poll()
        if meeting is None:
            return False
        now = get_dht_time()
        return meeting - MATCHMAKING_LEAD - 0.25 <= now + step_seconds and now < meeting - MATCHMAKING_LEAD / 2

    def agree(self) -> float:
        """The meeting time: an existing proposal still far enough ahead, or our own `now + window`."""
        meeting = self._read()
        if meeting is not None and meeting - get_dht_time() >= MATCHMAKING_LEAD / 2:
            return meeting
        proposal = get_dht_time() + self.schedule.window
        self.dht.store(self.key, proposal, expiration_time=proposal + 600, subkey=self._subkey)
        meeting = self._read()
        if meeting is None or meeting - get_dht_time() < MATCHMAKING_LEAD / 2:
            return proposal  # only stale proposals: the others have moved on, meet whoever comes at ours
        return meeting
