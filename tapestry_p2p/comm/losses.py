"""Lost spans, recovered or agreed: after a round's all-reduce, a member that lost a reducer's averaged span fetches it
from that reducer; what it still cannot get, the members tell each other, and every member zeroes the union, so that
all of them apply the same average even when one member lost a span that the others received.

Without it, a member that lost the span of a reducer that was alive for the others (a stream reset on a slow link, a
reducer that banned it as a stalled sender) ended the round on another model than its group, and had to download the
group's state: theta and the outer momentum, twice the model, which at 20 Mbit/s takes longer than a round, while its
servers move on (measured at RTT 150 ms: the download failed, and the partner was left out for the rest of the run).

Once our all-reduce is done, in the averager process:
1. **Fetch** each lost span from its reducer (`rpc_span`): the reducer keeps the encoded averages it published (the same
   bytes every member decoded, so the fetched values are the group's), for a few groups, and serves them to members of
   the group; one whose span is not complete yet is waited for. A span is a 1/n share of the coded model.
2. **Report**: we send our `Report` (group id, the reducers whose spans we still lack, the senders we refused, and
   when we propose the group meets for the next round: `comm.matchmaking.Pace`) to every other member, answer every
   member's report with ours (or "not done yet"), and wait for the report of every member whose span we hold (one
   whose span we lack may be dead: we do not wait for it), at most `REPORT_WAIT` seconds after our own end (a member
   may still wait up to the reducer timeout for a part that never comes). The next meeting is computed from the
   proposals heard (`comm.matchmaking.agreed_meeting`).
3. **Zero** the union of the lost reducers named by the members' reports (only members count, and only members can be
   named), except a span whose reducer refused the member that lost it (its parts failed the screening: that member
   alone re-syncs). Zeroed values get no update this round on any member, as for a reducer that died (the rule of
   `comm.allreduce`). A member whose report never came leaves the round *unconfirmed*: we may differ from the group,
   and the node compares states with it (`node.sync.after_round`).

Trust: a report is authenticated by libp2p as its sender's (and logged with it when it zeroes anything), and changes
nothing but which spans get no update: a member that lies about its losses, or stalls on purpose, can cost the group
that span's update for the round; one that tells each member another story can leave members on different models
until the next round's declarations elect the majority's state (a round's delay). It could do as much before, by
breaking its stream to one member only. A sender refused for what it sent cannot wipe its reducer's span this way. A
fetched span is the reducer's word, as its span in the all-reduce is; its parts must have the span's sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

# hivemind's servicer recognises streaming RPC handlers by typing.AsyncIterator only (not collections.abc's)
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import aiter_with_timeout

from tapestry_p2p.comm.agreement import MAX_MEMBERS, is_peer_list
from tapestry_p2p.comm.matchmaking import NextMeeting, Pace, agreed_meeting
from tapestry_p2p.comm.statesync.wire import UNPACK_ERRORS

logger = logging.getLogger(__name__)

REPORT_WAIT = 12.0  # seconds after our own end we wait for the others' reports (past hivemind's 10 s reducer timeout)
REPORT_TIMEOUT = 3.0  # how long one report request waits for its answer
SPAN_TIMEOUT = 15.0  # how long a span fetch waits for a part (its reducer may still average it, for up to 10 s)
MAX_BYTES_PER_VALUE = 4  # a fetched part's encoding is at most float32 ...
MAX_PART_OVERHEAD = 65536  # ... plus a codec's own metadata (block scales, code tables)
KEPT_GROUPS = 16  # groups whose reports we keep (ours, and early ones of groups we have not finished yet)
MAX_GROUP_ID_LENGTH = 32


@dataclass(frozen=True)
class Report:
    """What one member lost in a group's all-reduce: the reducers (peer ids) whose averaged spans it did not receive,
    and the senders it refused as a reducer (their parts failed its screening: `comm.screening`). `done` is False in
    an answer from a member whose all-reduce is not over yet (it has no report). `proposal`: when it can meet for the
    next round (`comm.matchmaking.Pace`), or None."""

    group_id: bytes
    lost: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()
    done: bool = True
    proposal: Optional[NextMeeting] = None

    def pack(self) -> bytes:
        p = self.proposal
        proposal = [] if p is None else [p.ready, p.finished, p.ahead]
        return msgpack.packb([self.group_id, list(self.lost), list(self.refused), self.done, proposal])

    @classmethod
    def unpack(cls, raw: bytes) -> Optional[Report]:
        """A report from untrusted bytes; None if malformed."""
        try:
            group_id, lost, refused, done, proposal = msgpack.unpackb(raw, raw=False)
        except UNPACK_ERRORS:
            return None
        if not (isinstance(group_id, bytes) and 0 < len(group_id) <= MAX_GROUP_ID_LENGTH and type(done) is bool):
            return None
        if not (is_peer_list(lost) and is_peer_list(refused)):
            return None
        if not (isinstance(proposal, list) and len(proposal) in (0, 3)):
            return None
        if not all(type(t) is float and math.isfinite(t) and t >= 0.0 for t in proposal):
            return None
        next_meeting = NextMeeting(*proposal) if proposal else None
        return cls(group_id, tuple(sorted(set(lost))), tuple(sorted(set(refused))), done, next_meeting)


def proposals_of(members: Sequence[str], reports: dict[str, Report]) -> list[NextMeeting]:
    """The members' proposals for the next meeting (`comm.matchmaking.agreed_meeting` makes one time of them; members
    that heard different reports may differ, and reconcile through the DHT, where each stores what it took)."""
    return [r.proposal for peer, r in sorted(reports.items()) if peer in members and r.proposal is not None]


def agreed_losses(members: Sequence[str], reports: dict[str, Report]) -> set[str]:
    """The reducers whose spans get no update on any member: every member's lost reducers (members only), except a
    span lost by a sender that its reducer refused (its parts failed the screening: the loss is its own doing, and
    must not cost the others that span's update; it alone is out of step, and re-syncs)."""
    agreed = set()
    for peer, report in reports.items():
        for reducer in report.lost if peer in members else ():
            if reducer in members and peer not in reports.get(reducer, Report(b"")).refused:
                agreed.add(reducer)
    return agreed


class LossReports:
    """Exchanging loss reports (mixed into `comm.averager.ExactAverager`; uses its p2p, prefix and members)."""

    if TYPE_CHECKING:  # provided by hivemind's DecentralizedAverager and ExactAverager
        _p2p: Any
        _members: Any
        prefix: str
        peer_id: PeerID
        clock: Any  # (comm.voting: the swarm's clock)

    _running_groups: dict[bytes, asyncio.Future]  # (comm.averager) committed group id -> its runner, once built
    _reports: OrderedDict[bytes, dict[str, Report]]
    _reports_changed: Optional[asyncio.Event]
    _spans: OrderedDict[bytes, tuple[tuple[str, ...], list[runtime_pb2.Tensor]]]

    def _init_reports(self) -> None:
        self._reports = OrderedDict()
        self._reports_changed = None  # (created in the averager's event loop)
        self._report_tasks: set[asyncio.Task] = set()
        self._spans = OrderedDict()  # group id -> (its members, the encoded averages of our span)

    # ---- fetching a lost span ----

    def _keep_span(self, group_id: bytes, members: Sequence[str], parts: Optional[list[runtime_pb2.Tensor]]) -> None:
        """Keep the encoded averages of our span of a group (for members that lost them), for KEPT_GROUPS groups."""
        if parts is None:
            return
        self._spans[group_id] = (tuple(members), parts)
        while len(self._spans) > KEPT_GROUPS // 4:
            self._spans.popitem(last=False)

    async def _fetch_span(self, reducer: str, group_id: bytes, numels: Sequence[int]) -> Optional[torch.Tensor]:
        """A lost span's averaged values (flat), from its reducer; None if it cannot serve them, or serves other
        sizes."""
        request = runtime_pb2.ExpertRequest(metadata=msgpack.packb(group_id))
        parts: list[torch.Tensor] = []
        try:
            stub = type(self).get_stub(self._p2p, PeerID.from_base58(reducer), namespace=self.prefix)  # type: ignore[attr-defined]
            stream = await asyncio.wait_for(stub.rpc_span(request), SPAN_TIMEOUT)
            async for message in aiter_with_timeout(stream, SPAN_TIMEOUT):
                if message.code != averaging_pb2.AVERAGED_PART or len(parts) == len(numels):
                    return None
                if len(message.tensor_part.buffer) > MAX_BYTES_PER_VALUE * numels[len(parts)] + MAX_PART_OVERHEAD:
                    return None  # (larger than any codec's encoding of that many values)
                part = deserialize_torch_tensor(message.tensor_part)
                if part.numel() != numels[len(parts)] or not torch.isfinite(part).all():
                    return None
                parts.append(part.reshape(-1))
        except Exception as e:  # noqa: BLE001 (a reducer that cannot serve its span, whatever the cause: it is lost)
            logger.debug("could not fetch the span of %s: %r", reducer, e)
            return None
        return torch.cat(parts) if len(parts) == len(numels) else None

    async def rpc_span(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """The encoded averages of our span of a group, part by part, to a member of it that lost them (waiting until
        they are all published, if our all-reduce is still under way); nothing to anyone else."""
        try:
            group_id = msgpack.unpackb(request.metadata)
        except UNPACK_ERRORS:
            return
        if not isinstance(group_id, bytes):
            return
        members, parts = await self._span_of(group_id)
        if parts is None or context.remote_id.to_base58() not in members:
            return
        for part in parts:
            yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=part)

    async def _span_of(self, group_id: bytes) -> tuple[Sequence[str], Optional[list[runtime_pb2.Tensor]]]:
        """The members of a group of ours and our span's published parts (None: not a group of ours, or our span of
        it was not completed within SPAN_TIMEOUT)."""
        if group_id in self._spans:
            return self._spans[group_id]
        future = self._running_groups.get(group_id)
        if future is None:
            return (), None
        try:
            runner = await asyncio.wait_for(asyncio.shield(future), SPAN_TIMEOUT)  # (committed: being built)
            if runner is None:
                return (), None
            await asyncio.wait_for(runner.span_published.wait(), SPAN_TIMEOUT)
        except TimeoutError:
            return (), None
        return [p.to_base58() for p in runner.ordered_peer_ids], runner.published_span()

    # ---- reporting what is still lost ----

    async def _agree_on_losses(
        self, group_id: bytes, members: Sequence[str], lost: set[str], refused: set[str], pace: Pace
    ) -> tuple[set[str], list[str], float]:
        """Tell the group what we lost (and whom we refused) and when we propose to meet next, hear the same from
        them; returns the reducers every member zeroes, the members whose report we waited for in vain (see the
        module docstring), and the next meeting their proposals make (0.0: none)."""
        me = self.peer_id.to_base58()
        ours = Report(group_id, tuple(sorted(lost)), tuple(sorted(refused)), proposal=pace.at(self.clock.now()))
        self._keep(group_id, me, ours)
        for peer in members:
            if peer != me:
                task = asyncio.create_task(self._send_report(peer, ours))
                self._report_tasks.add(task)
                task.add_done_callback(self._report_tasks.discard)
        expected = [p for p in members if p != me and p not in lost]
        deadline = asyncio.get_running_loop().time() + REPORT_WAIT
        while True:
            reports = self._reports.get(group_id, {})
            missing = [p for p in expected if p not in reports]
            left = deadline - asyncio.get_running_loop().time()
            if not missing or left <= 0:
                break
            changed = self._changed()
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=left)
        reports = self._reports.get(group_id, {})
        agreed = agreed_losses(members, reports)
        for peer, report in sorted(reports.items()):
            named = sorted(set(report.lost) & agreed)  # (member peer ids only: nothing else a peer sent is printed)
            if peer != me and named:
                logger.info("groupmate %s lost the spans of %s: they get no update this round", peer, named)
        if missing:
            logger.info("%d groupmates did not say which spans they lost: we may differ from the group", len(missing))
        proposals = proposals_of(members, reports)
        waited = REPORT_WAIT if len(proposals) < len(members) else 0.0
        meeting = agreed_meeting(proposals, self.clock.now(), pace.limit, waited)
        return agreed, missing, meeting

    async def _send_report(self, peer: str, report: Report) -> None:
        request = runtime_pb2.ExpertRequest(metadata=report.pack())
        try:
            stub = type(self).get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)  # type: ignore[attr-defined]
            response = await asyncio.wait_for(stub.rpc_losses(request), REPORT_TIMEOUT)
        except Exception as e:  # noqa: BLE001 (a member that does not answer tells us nothing; it may report to us)
            logger.debug("no answer from %s to our loss report: %r", peer, e)
            return
        answer = Report.unpack(response.metadata)
        if answer is not None and answer.done and answer.group_id == report.group_id:
            self._keep(report.group_id, peer, answer)

    def _keep(self, group_id: bytes, peer: str, report: Report) -> None:
        """Keep a member's report (at most one per peer, for at most KEPT_GROUPS groups: ours, so a peer cannot evict
        them with reports for made-up group ids; one that reports before we hold the group answers our report later)."""
        if group_id not in self._reports:
            if len(self._reports) >= KEPT_GROUPS:
                self._reports.popitem(last=False)
            self._reports[group_id] = {}
        reports = self._reports[group_id]
        if peer in reports or len(reports) < MAX_MEMBERS:
            reports[peer] = report
            self._changed().set()

    def _changed(self) -> asyncio.Event:
        if self._reports_changed is None:
            self._reports_changed = asyncio.Event()
        return self._reports_changed

    async def rpc_losses(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A member's loss report for a group; we answer with ours for that group (or "not done yet")."""
        peer = context.remote_id.to_base58()
        report = Report.unpack(request.metadata)
        if report is None or not report.done or not self._members.allows(peer):
            logger.debug("ignored a malformed loss report, or one from a non-member (%s)", peer)
            return runtime_pb2.ExpertResponse()
        if report.group_id in self._running_groups or report.group_id in self._spans:  # (only groups of ours)
            self._keep(report.group_id, peer, report)
        ours = self._reports.get(report.group_id, {}).get(self.peer_id.to_base58(), Report(report.group_id, done=False))
        return runtime_pb2.ExpertResponse(metadata=ours.pack())
