"""`ExactAverager`: hivemind's DecentralizedAverager process, running agreed groups and our bit-exact runner, serving
our shared state.

What it adds to hivemind's averager (its process, pipe, p2p servicer, tensor locks and timeouts stay hivemind's):
- each round is one `agreed_step`: the group comes from the members' signed declarations and votes
  (`comm.voting`, `comm.agreement`), not from hivemind's leader/follower matchmaking, and the all-reduce runs only
  among peers that committed the same group;
- each all-reduce runs `runner_class` (`allreduce.ExactAllReduceRunner`), ends with lost spans fetched from their
  reducers, or zeroed on every member (`comm.losses`), and reports an `AllReduceOutcome` (the group, traffic, lost
  spans, lost senders, refusals and clips);
- the shared state is served and downloaded in slices (`statesync/transport.py`, mixed in);
- only members take part (`security.membership.Members`; an open swarm admits everyone): a non-member's votes, parts
  and state requests are refused and logged with its peer id;
- a part for a group id we did not commit is refused at its first message (BAD_GROUP_ID), after waiting only while
  we are still voting for that very group; spans are equal (nobody claims a larger share through its bandwidth); the
  codec, the tensors' shapes, H and the run spec are part of the schema peers must share to meet;
- a failure inside our overrides is a bug, not a network event: it is logged here with its traceback and reaches the
  node as `AveragingBug`, so the round is reported as failed rather than as a network failure.

Faults are injected by test subclasses (`testing.faults`), which override `runner_class` or `_allreduce`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# hivemind's servicer recognises streaming RPC handlers by typing.AsyncIterator only (not collections.abc's)
from typing import Any, AsyncIterator, Optional

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.dht.routing import DHTID
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, as_aiter, azip, enter_asynchronously
from hivemind.utils.mpfuture import MPFuture

from tapestry_p2p.comm import agreement
from tapestry_p2p.comm.agreement import Contribution, Declaration, Outcome
from tapestry_p2p.comm.allreduce import NETWORK_FAILURES, ExactAllReduceRunner, Traffic, fill_span, zero_spans
from tapestry_p2p.comm.losses import LossReports
from tapestry_p2p.comm.matchmaking import Pace
from tapestry_p2p.comm.screening import Screen, weight_for
from tapestry_p2p.comm.statesync.transport import StateTransport
from tapestry_p2p.comm.voting import GroupVoting, Timing
from tapestry_p2p.p2p import hivemind_compat
from tapestry_p2p.p2p.processes import keeping_sigint_handler
from tapestry_p2p.security.membership import Members

logger = logging.getLogger(__name__)


class AveragingBug(RuntimeError):
    """An exception inside tapestry's all-reduce code; already logged with its traceback in the averager process."""


@dataclass
class AllReduceOutcome:
    """What one agreed step returns to the training process (pickled across the averager's process boundary)."""

    traffic: Traffic = field(default_factory=Traffic)
    group_id: bytes = b""  # the committed group's id (empty: we were out of the round)
    members: list[str] = field(default_factory=list)  # its members' peer ids, sorted
    attempt: int = 1  # the agreement attempt that committed it (or that we left at)
    left_out: str = ""  # why we are not in the round's group (comm.agreement's reasons; empty: we are in it)
    failure: str = ""  # the all-reduce with our committed group failed: why (then `left_out` says so too)
    others: list[str] = field(default_factory=list)  # out of the round: who will hold the state it ends on
    failed_fraction: float = 0.0  # share of values some member lost (they get no update this round, on every member)
    failed_spans: list[tuple[int, int]] = field(default_factory=list)  # their [start, end) in the flat layout
    lost_reducers: list[str] = field(default_factory=list)  # the reducers whose spans we lost ourselves
    recovered: list[str] = field(default_factory=list)  # ... of which we fetched the span from its reducer after
    agreed_lost: list[str] = field(default_factory=list)  # the spans some member still lacked (comm.losses): zeroed
    unreported: list[str] = field(default_factory=list)  # members whose loss report never came (we may differ)
    next_meeting: float = 0.0  # the group's next meeting, from its reports (matchmaking.agreed_meeting; 0.0: none)
    started: float = 0.0  # time.time() when the group was committed and the all-reduce began
    averaged: float = 0.0  # time.time() when our last averaged part was in (then: serving, losses, reports)
    senders_lost: int = 0  # groupmates whose parts never reached us as a reducer (our span averages the others')
    refused: dict[str, str] = field(default_factory=dict)  # groupmate -> why we refused its parts as a reducer
    clipped: dict[str, float] = field(default_factory=dict)  # groupmate -> the factor we scaled its parts by


class ExactAverager(StateTransport, GroupVoting, LossReports, DecentralizedAverager):
    """DecentralizedAverager with agreed groups, ExactAllReduceRunner, per-round outcomes and a pluggable shared state.

    :param owner: our owner-signed DHT subkey (`security.dht_auth.owner_subkey`): declarations are stored under it.
    :param state_fn: called in the host process when a peer downloads our state; returns `(metadata, tensors)`.
      None disables state sharing.
    :param members: who may take part (an open swarm admits everyone).
    :param max_steps: H, the largest weight a sender may claim; part of the schema.
    :param codec: the codec's name; part of the schema (hivemind's own schema hash ignores it).
    :param spec: the run spec's digest; part of the schema.
    :param clip_multiple: see `screening.Screen`.
    :param timing: the agreed group's deadlines (`voting.Timing`).
    :param error_sink: tensors shaped like the averaged ones (in shared memory) where each round writes what our sent
      parts lost to the codec (see `error_feedback`); None: no error feedback.
    Other arguments are DecentralizedAverager's.
    """

    runner_class: type[ExactAllReduceRunner] = ExactAllReduceRunner

    def __init__(
        self,
        *args: Any,
        owner: bytes,
        members: Members,
        max_steps: int,
        codec: str,
        clip_multiple: float,
        spec: str = "",
        timing: Optional[Timing] = None,
        state_fn: Optional[Callable[[], tuple[Any, Sequence[torch.Tensor]]]] = None,
        error_sink: Optional[Sequence[torch.Tensor]] = None,
        start: bool = False,
        **kwargs: Any,
    ) -> None:
        if not owner:
            raise ValueError("an averager needs our owner-signed DHT subkey to declare its rounds")
        self._owner = owner
        self._state_fn = state_fn
        self._error_sink = error_sink
        self._members, self._max_steps, self._clip_multiple = members, max_steps, clip_multiple
        self._allreduces = 0
        self._init_voting(timing or Timing())
        self._init_reports()
        # our state is served once the node advertises its round (StateClient.publish_round), after its first catch-up
        super().__init__(*args, allow_state_sharing=False, start=False, **kwargs)
        # peers meet only if they average the same shapes with the same codec and H (A7 in docs/THREAT-MODEL.md), and
        # train the same run spec (node.spec)
        hivemind_hash: bytes = self.schema_hash
        self.schema_hash = DHTID.generate(source=[hivemind_hash.hex(), codec, max_steps, spec]).to_bytes()
        if start:
            self.run_in_background(await_ready=True)

    @classmethod
    def _get_handle_name(cls, namespace: Optional[str], method_name: str) -> str:
        """Our RPCs are named after the protocol, not the class (hivemind uses the class name): a subclass, such as a
        test's faulty peer, serves and calls the same handlers."""
        name: str = DecentralizedAverager._get_handle_name.__func__(ExactAverager, namespace, method_name)
        return name

    def run_in_background(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        keeping_sigint_handler(lambda: super(ExactAverager, self).run_in_background(await_ready, timeout))

    def run(self) -> None:
        hivemind_compat.install("averager")
        renew_torch_thread_pool()
        super().run()

    async def _declare_for_download_periodically(self) -> None:
        # (started once by hivemind when the averager process runs: so is our clock measurement)
        asyncio.create_task(self._keep_clock())
        await super()._declare_for_download_periodically()

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], None]:
        if self._state_fn is None:
            raise RuntimeError("state sharing is off for this averager")
        metadata, tensors = self._state_fn()
        return metadata, tensors, None

    # ---- membership ----

    def _admits(self, context: P2PContext, what: str) -> bool:
        peer = context.remote_id.to_base58()
        if self._members.allows(peer):
            return True
        logger.warning("refused %s from %s: not a member of the consortium", what, peer)
        return False

    def replace_members(self, names: Optional[dict[str, str]], version: int) -> None:
        """Install a new member list in the averager process (a consortium update; see security.consortium)."""
        self._call_in_averager(self._replace_members.__name__, 30, names=names, version=version)

    async def _replace_members(self, names: Optional[dict[str, str]], version: int, future: MPFuture) -> None:
        self._members.replace(names, version)
        future.set_result(None)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """hivemind's matchmaking is not used (groups are agreed, `comm.voting`): every join request is refused (a
        non-member's as such, and logged)."""
        admitted = self._admits(context, "a group join")
        code = averaging_pb2.NOT_LOOKING_FOR_GROUP if admitted else averaging_pb2.PROTOCOL_VIOLATION
        yield averaging_pb2.MessageFromLeader(code=code)

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """A groupmate's parts: only for a group we committed (we wait while we still vote for that very group);
        anything else is refused at the first message: a sender never waits a timeout for a peer outside its group."""
        if not self._admits(context, "averaging parts"):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        try:
            request = await asyncio.wait_for(anext(stream), self.timing.ask_timeout * 2)
        except (TimeoutError, StopAsyncIteration):
            return
        if request.group_id not in self._running_groups and await self._decision(request.group_id):
            # we just committed it: our round registers the group too, but this handler may resume first (an 8-partner
            # soak saw a member refuse every groupmate's parts of the group it had committed a moment before)
            self._expect_parts(request.group_id)
        future = self._running_groups.get(request.group_id)
        runner = None if future is None else await future  # (committed: our runner is being built)
        if runner is None:  # not a group of ours, or our all-reduce of it never started
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        async for message in runner.rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

    async def rpc_download_state(
        self, _request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """hivemind's whole-state download is not used (peers download slices, `rpc_state_slice`): refused."""
        logger.info("refused a whole-state download from %s (tapestry serves slices only)", context.remote_id)
        return
        yield  # an async generator, like the handler it replaces

    # ---- one round ----

    def intend(self, declaration: Declaration) -> None:
        """Store our declaration for a meeting we now know, in the background (called from the node's process)."""
        self._outer_pipe.send((self._intend.__name__, [], dict(declaration=declaration)))

    def agreed_step(
        self, declaration: Declaration, contribution: Contribution, timeout: float, pace: Pace
    ) -> AllReduceOutcome:
        """Agree on the round's group at `declaration.meeting` and all-reduce with it (called from the node's
        process; our tensors hold our update; `pace`: when we can meet next). A failed all-reduce is an outcome
        (`failure`), not an exception."""
        return self._call_in_averager(
            self._agreed_step.__name__, timeout, declaration=declaration, contribution=contribution, pace=pace
        )

    async def _agreed_step(
        self, declaration: Declaration, contribution: Contribution, pace: Pace, future: MPFuture
    ) -> None:
        try:
            future.set_result(await self._agreed_round(declaration, contribution, pace))
        except BaseException as e:
            if not future.done():
                future.set_exception(e)
            if not isinstance(e, Exception):
                raise

    async def _agreed_round(self, declaration: Declaration, contribution: Contribution, pace: Pace) -> AllReduceOutcome:
        decided = await self._agree(declaration, contribution)
        if decided.group is None:
            return AllReduceOutcome(attempt=decided.attempt, left_out=decided.reason, others=list(decided.others))
        try:
            return await self._allreduce(decided, weight_for(contribution.steps, self._max_steps), pace)
        except (*NETWORK_FAILURES, AveragingBug) as e:
            # our group's members may have finished the round without us: we follow them (the node takes the state
            # the round ends on) rather than apply anything of our own
            if isinstance(e, AveragingBug):
                failure = str(e)
            else:
                failure = "all-reduce failed: " + (str(e).splitlines()[0] if str(e).strip() else type(e).__name__)
            me = self.peer_id.to_base58()
            return AllReduceOutcome(
                group_id=decided.group.group_id,
                attempt=decided.attempt,
                left_out=failure,
                failure=failure,
                others=[p for p in decided.group.members if p != me],
            )

    async def _allreduce(self, decided: Outcome, weight: float, pace: Pace) -> AllReduceOutcome:
        """Run the all-reduce with a committed group (every member takes an equal span, in `agreement.ordered`)."""
        assert decided.group is not None
        order = agreement.ordered(decided.group)
        peer_ids = tuple(PeerID.from_base58(p) for p in order)
        group = GroupInfo(decided.group.group_id, peer_ids, gathered=())
        # each sender's contribution as it told us (one we never heard from: none, and its parts are refused here)
        told = [decided.contributions.get(p, Contribution()) for p in order]
        screen = Screen(
            declared_steps=[c.steps for c in told],
            declared_norms=[c.norm for c in told],
            codec=self._codec_type,
            max_steps=self._max_steps,
            clip_multiple=self._clip_multiple,
        )
        n = len(order)
        self._allreduces += 1
        self._expect_parts(group.group_id)
        outcome = AllReduceOutcome(
            group_id=group.group_id,
            members=sorted(order),
            attempt=decided.attempt,
            started=time.time(),
        )
        try:
            async with enter_asynchronously(self.get_tensors()) as tensors:
                runner = self.runner_class(
                    screen=screen,
                    error_sink=self._error_sink,
                    p2p=self._p2p,
                    servicer_type=type(self),
                    prefix=self.prefix,
                    tensors=tensors,
                    group_id=group.group_id,
                    ordered_peer_ids=peer_ids,
                    peer_fractions=tuple([1.0 / n] * n),
                    modes=tuple([AveragingMode.NODE] * n),
                    weight=weight,
                    tensor_infos=self.tensor_infos,
                    **{k: v for k, v in self.allreduce_kwargs.items() if k != "min_vector_size"},
                )
                outcome.traffic, outcome.refused, outcome.clipped = runner.traffic, runner.refused, runner.clipped
                self._running_groups[group.group_id].set_result(runner)
                await asyncio.wait_for(self._reduce(runner, tensors, outcome, pace), self._allreduce_timeout)
        except NETWORK_FAILURES:
            raise
        except Exception as e:
            logger.exception("all-reduce #%d failed inside tapestry's code (a bug, not the network)", self._allreduces)
            raise AveragingBug(f"internal error in the all-reduce: {type(e).__name__}: {e}") from e
        finally:
            pending = self._running_groups.pop(group.group_id, None)
            if pending is not None and not pending.done():
                pending.set_result(None)  # parts waiting for a runner that never came are refused
            elif pending is not None and pending.result() is not None:
                pending.result().finalize(cancel=True)
        return outcome

    async def _reduce(
        self, runner: ExactAllReduceRunner, tensors: Sequence[torch.Tensor], outcome: AllReduceOutcome, pace: Pace
    ) -> None:
        async for tensor, averaged in azip(as_aiter(*tensors), runner):
            tensor.copy_(averaged)
        outcome.averaged = time.time()
        await runner.served()
        # A reducer that failed may have sent its span to some members and not to others; nobody uses any span a member
        # lost (the members tell each other, comm.losses), so all of them end the round with the same values.
        members = [peer.to_base58() for peer in runner.ordered_peer_ids]
        self._keep_span(runner.group_id, members, runner.published_span())
        lost = {members[i] for i in runner.failed_reducers}
        fetched = await asyncio.gather(
            *(self._fetch_span(p, runner.group_id, runner.part_numels[members.index(p)]) for p in sorted(lost))
        )
        for reducer, values in zip(sorted(lost), fetched, strict=True):
            if values is not None:
                fill_span(tensors, runner.spans_of([members.index(reducer)])[0], values)
                outcome.recovered.append(reducer)
        still_lost = lost - set(outcome.recovered)
        refused = {p for p in runner.refused if p in members}
        agreed, outcome.unreported, outcome.next_meeting = await self._agree_on_losses(
            runner.group_id, members, still_lost, refused, pace
        )
        outcome.lost_reducers, outcome.agreed_lost = sorted(lost), sorted(agreed | still_lost)
        outcome.failed_spans = runner.spans_of([members.index(p) for p in outcome.agreed_lost])
        zeroed = zero_spans(tensors, outcome.failed_spans)
        outcome.failed_fraction = zeroed / max(runner.tensor_part_container.total_size, 1)
        failed_after = runner.tensor_part_reducer.sender_failed_after
        outcome.senders_lost = sum(after != float("inf") for after in failed_after)

    @property
    def _codec_type(self) -> int:
        return int(self.allreduce_kwargs["compression"].compression_type)


def renew_torch_thread_pool() -> None:
    """Call first thing in a forked process that uses torch from several threads (the averager process).

    torch leaks its thread pool in a forked child and builds a new one on first use, without a lock: two threads that
    use torch for the first time at once (hivemind encodes parts in a thread pool) can find no pool at all, and the
    encoding fails with `RuntimeError: pool INTERNAL ASSERT FAILED ... Invalid thread pool!`; that part is never sent,
    and the round loses a span. Building it here, before any other thread runs, closes the race."""
    torch.set_num_threads(torch.get_num_threads())
