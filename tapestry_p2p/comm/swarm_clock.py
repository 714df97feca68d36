"""The swarm's clock: our wall clock corrected by the median offset to our peers' clocks.

Every deadline of a round is read on each peer's own clock (the meeting, the declarations' cut-off), so peers whose
clocks are apart by more than the declarations' margin read the DHT at different real times and do not meet (two
partners 0.5 s off in opposite directions, 1 s apart, never met as one group). The averager process asks a few peers
for their clock every CLOCK_PERIOD seconds (`rpc_clock`, in `comm.voting`), estimates each offset as
`their time - (our time at request + our time at answer) / 2`, drops answers slower than MAX_SAMPLE_RTT, and takes the
median of the offsets and our own zero. Peers answer their raw clock, never a corrected one, so the estimates do not
feed back into each other; a median bounds what a minority of lying peers can shift. The offset lives in shared
memory, so the node's process (the meeting clock) reads the same swarm time as the averager process.
"""

from __future__ import annotations

import multiprocessing
import statistics
from collections.abc import Sequence

from hivemind.utils import get_dht_time

CLOCK_PERIOD = 10.0  # seconds between two measurements of our offset
MAX_SAMPLE_RTT = 0.5  # seconds: a slower answer says too little about the peer's clock (a stalled peer, a slow link)
SAMPLED_PEERS = 8  # peers asked per measurement
MAX_OFFSET = 60.0  # seconds: a peer claiming a clock further off is ignored (hivemind itself refuses 3 s and more)


class SwarmClock:
    """Our offset from the swarm's median clock (shared memory), and the corrected time."""

    def __init__(self) -> None:
        self._offset = multiprocessing.Value("d", 0.0)

    @property
    def offset(self) -> float:
        return float(self._offset.value)

    def now(self) -> float:
        """The swarm's time: what meetings, cut-offs and declarations are in."""
        return get_dht_time() + self.offset

    def update(self, offsets: Sequence[float]) -> None:
        """Take the median of measured offsets (each `their clock - ours`) and our own zero."""
        usable = [o for o in offsets if abs(o) <= MAX_OFFSET]
        if usable:
            self._offset.value = statistics.median([0.0, *usable])


def offset_of(requested: float, answered: float, theirs: float) -> float:
    """A peer's clock minus ours, from one exchange: its time against the middle of our request's round trip."""
    return theirs - (requested + answered) / 2
