"""`ExactAverager`: hivemind's DecentralizedAverager running our bit-exact runner, serving our shared state.

It glues three things onto hivemind's averager (matchmaking, timeouts and load balancing stay hivemind's):
- each all-reduce runs `ExactAllReduceRunner` (`allreduce.py`) and reports an `AllReduceOutcome` (traffic, lost
  spans, lost senders) instead of hivemind's bare gathered metadata;
- the shared state is served and downloaded in slices (`statesync/transport.py`, mixed in);
- only members take part (`security.membership.Members`; an open swarm admits everyone): a non-member's group join,
  parts and state requests are refused and logged with its peer id, and a group is cut down to its members;
- every member's gathered data is validated before use (a malformed entry drops that member from the round instead
  of aborting it), spans are equal (a member cannot claim a larger share of the reduction through its bandwidth), and
  the codec, the tensors' shapes and H are part of the schema peers must share to be matched;
- a failure inside our overrides is a bug, not a network event: it is logged here with its traceback and reaches the
  node as `AveragingBug`, so the round is reported as failed rather than as "no group" (hivemind would wrap it in a
  MatchmakingException like any network failure).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

# hivemind's servicer recognises streaming RPC handlers by typing.AsyncIterator only (not collections.abc's)
from typing import Any, AsyncIterator, Optional

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException
from hivemind.dht.routing import DHTID
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import as_aiter, azip, enter_asynchronously
from hivemind.utils.mpfuture import MPFuture

from tapestry_p2p.comm.allreduce import NETWORK_FAILURES, ExactAllReduceRunner, Traffic, zero_spans
from tapestry_p2p.comm.screening import RoundMeta, Screen
from tapestry_p2p.comm.statesync.transport import StateTransport
from tapestry_p2p.p2p import hivemind_compat
from tapestry_p2p.p2p.processes import keeping_sigint_handler
from tapestry_p2p.security.membership import Members

logger = logging.getLogger(__name__)

# `fault(event, allreduce_index)`, called in the averager process at "served" (after serving one averaged part to a
# groupmate) and "finished" (after our tensors hold the average, before the outcome is accounted); tests arm it
# (tapestry_p2p.testing.faults), production passes None.
FaultHook = Callable[[str, int], None]


class AveragingBug(hivemind_compat.ReportedFailure, AllreduceException):
    """An exception inside tapestry's all-reduce overrides; already logged with its traceback in the averager process.

    An AllreduceException, so hivemind ends the step with it (instead of leaving the task's exception unretrieved)."""


@dataclass
class AllReduceOutcome:
    """What one all-reduce returns to the training process (pickled across the averager's process boundary)."""

    gathered: dict[str, Any]  # peer id (base58) -> the metadata that peer passed as `gather` (untrusted)
    traffic: Traffic
    failed_fraction: float = 0.0  # share of values whose reducer failed (those values get no update this round)
    failed_spans: list[tuple[int, int]] = field(default_factory=list)  # their [start, end) in the flat layout
    started: float = 0.0  # time.time() when the group was formed and the all-reduce began (before: matchmaking)
    senders_lost: int = 0  # groupmates whose parts never reached us as a reducer (our span averages the others')
    dropped: dict[str, str] = field(default_factory=dict)  # groupmate -> why it was left out before the all-reduce
    refused: dict[str, str] = field(default_factory=dict)  # groupmate -> why we refused its parts as a reducer
    clipped: dict[str, float] = field(default_factory=dict)  # groupmate -> the factor we scaled its parts by


class ExactAverager(StateTransport, DecentralizedAverager):
    """DecentralizedAverager with ExactAllReduceRunner, per-round outcomes and a pluggable shared state.

    :param state_fn: called in the host process when a peer downloads our state; returns `(metadata, tensors)`.
      None disables state sharing.
    :param members: who may take part (an open swarm admits everyone).
    :param max_steps: H, the largest weight a sender may claim; part of the schema.
    :param codec: the codec's name; part of the schema (hivemind's own schema hash ignores it).
    :param spec: the run spec's digest; part of the schema.
    :param clip_multiple: see `screening.Screen`.
    :param error_sink: tensors shaped like the averaged ones (in shared memory) where each round writes what our sent
      parts lost to the codec (see `error_feedback`); None: no error feedback.
    :param fault: a test hook (see FaultHook); None in production.
    Other arguments are DecentralizedAverager's.
    """

    def __init__(
        self,
        *args: Any,
        members: Members,
        max_steps: int,
        codec: str,
        clip_multiple: float,
        spec: str = "",
        state_fn: Optional[Callable[[], tuple[Any, Sequence[torch.Tensor]]]] = None,
        fault: Optional[FaultHook] = None,
        error_sink: Optional[Sequence[torch.Tensor]] = None,
        start: bool = False,
        **kwargs: Any,
    ) -> None:
        self._state_fn = state_fn
        self._error_sink = error_sink
        self._fault = fault
        self._members, self._max_steps, self._clip_multiple = members, max_steps, clip_multiple
        self._allreduces = 0
        self._outcome = AllReduceOutcome({}, Traffic())
        self._bug: Optional[AveragingBug] = None
        super().__init__(*args, allow_state_sharing=state_fn is not None, start=False, **kwargs)
        # peers are matched only if they average the same shapes with the same codec and H (A7 in the review), and
        # train the same run spec (node.spec)
        hivemind_hash: bytes = self.schema_hash
        self.schema_hash = DHTID.generate(source=[hivemind_hash.hex(), codec, max_steps, spec]).to_bytes()
        if start:
            self.run_in_background(await_ready=True)

    def run_in_background(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        keeping_sigint_handler(lambda: super(ExactAverager, self).run_in_background(await_ready, timeout))

    def run(self) -> None:
        hivemind_compat.install("averager")
        renew_torch_thread_pool()
        super().run()

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
        future: MPFuture = MPFuture()
        self._outer_pipe.send(("_replace_members", [], dict(names=names, version=version, future=future)))
        future.result(timeout=30)

    async def _replace_members(self, names: Optional[dict[str, str]], version: int, future: MPFuture) -> None:
        self._members.replace(names, version)
        future.set_result(None)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not self._admits(context, "a group join"):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if not self._admits(context, "averaging parts"):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(
        self, _request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """hivemind's whole-state download is not used (peers download slices, `rpc_state_slice`): refused."""
        logger.info("refused a whole-state download from %s (tapestry serves slices only)", context.remote_id)
        return
        yield  # an async generator, like the handler it replaces

    # ---- one all-reduce ----

    def _admitted_group(self, group_info: GroupInfo) -> tuple[GroupInfo, dict[str, RoundMeta], dict[str, str]]:
        """The members of a formed group that may take part, with their round metadata, and why the others may not.

        Every member receives the same gathered data from the leader and drops the same peers, so the smaller group
        is the same everywhere."""
        kept, metas, dropped = [], {}, {}
        for peer, raw in zip(group_info.peer_ids, group_info.gathered, strict=True):
            name = peer.to_base58()
            meta = _parse_gathered(self.serializer, raw)
            if not self._members.allows(name):
                dropped[name] = "not a member of the consortium"
            elif meta is None:
                dropped[name] = "sent malformed round metadata"
            else:
                kept.append((peer, raw))
                metas[name] = meta
        for name, reason in dropped.items():
            logger.warning("left groupmate %s out of this round: %s", name, reason)
        if self.peer_id not in [peer for peer, _ in kept] or len(kept) < 2:
            raise AllreduceException(f"no valid groupmate left ({len(dropped)} left out)")
        peers, gathered = zip(*kept, strict=True)
        return GroupInfo(group_info.group_id, tuple(peers), tuple(gathered)), metas, dropped

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        # forked from hivemind 1.1.12 averaging/averager.py:DecentralizedAverager._aggregate_with_group; changes: the
        # group is cut down to its admitted members with well-formed metadata, every member is a full node, spans are
        # equal (hivemind splits by self-declared bandwidth), and each reducer screens its senders' parts.
        self._bug = None
        started = time.time()
        try:
            group, metas, dropped = self._admitted_group(group_info)
            n = len(group.peer_ids)
            ordered = [metas[peer.to_base58()] for peer in group.peer_ids]
            screen = Screen(
                declared_steps=[m.steps for m in ordered],
                declared_norms=[m.norm for m in ordered],
                codec=self._codec_type,
                max_steps=self._max_steps,
                clip_multiple=self._clip_multiple,
            )
            async with enter_asynchronously(self.get_tensors()) as local_tensors:
                await self._run_allreduce_inplace_(
                    local_tensors,
                    group,
                    peer_fractions=tuple([1.0 / n] * n),
                    modes=tuple([AveragingMode.NODE] * n),
                    screen=screen,
                    **kwargs,
                )
        except BaseException as e:
            if self._bug is not None:  # hivemind wraps failures like a network failure: report ours as a bug
                raise self._bug from None
            raise MatchmakingException(f"Unable to run All-Reduce: {e}") from e
        self._outcome.gathered = {name: asdict(meta) for name, meta in metas.items()}
        self._outcome.dropped = dropped
        self._outcome.started = started
        return self._outcome

    @property
    def _codec_type(self) -> int:
        return int(self.allreduce_kwargs["compression"].compression_type)

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: Optional[bytes] = None, **kwargs: Any
    ) -> None:
        self._allreduces += 1
        try:
            await self._exact_allreduce(tensors, group_info, group_id, **kwargs)
        except NETWORK_FAILURES:
            raise
        except Exception as e:
            logger.exception(
                "all-reduce #%d failed inside tapestry's overrides (a bug, not the network)", self._allreduces
            )
            self._bug = AveragingBug(f"internal error in the all-reduce: {type(e).__name__}: {e}")
            raise self._bug from e

    async def _exact_allreduce(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: Optional[bytes], **kwargs: Any
    ) -> None:
        index, fault = self._allreduces, self._fault
        group_id = group_info.group_id if group_id is None else group_id
        runner = ExactAllReduceRunner(
            after_part_served=None if fault is None else lambda: fault("served", index),
            error_sink=self._error_sink,
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        self._outcome = AllReduceOutcome({}, runner.traffic, refused=runner.refused, clipped=runner.clipped)
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            raise ValueError("tapestry peers always contribute to the average; auxiliary mode is not supported")
        async for tensor, averaged in azip(as_aiter(*tensors), runner):
            tensor.copy_(averaged)
        try:  # senders that never show up are banned by hivemind after sender_timeout; don't wait longer than that
            await asyncio.wait_for(runner.all_served.wait(), timeout=runner.sender_timeout)
        except TimeoutError:
            logger.debug("some groupmates were not served their averaged parts in time")
        if fault is not None:
            fault("finished", index)
        # A reducer that failed may have sent part of its span to some members and not to others; nobody uses any of
        # it, so all survivors end the round with the same values.
        self._outcome.failed_spans = runner.failed_spans()
        zeroed = zero_spans(tensors, self._outcome.failed_spans)
        self._outcome.failed_fraction = zeroed / max(runner.tensor_part_container.total_size, 1)
        failed_after = runner.tensor_part_reducer.sender_failed_after
        self._outcome.senders_lost = sum(after != float("inf") for after in failed_after)


def _parse_gathered(serializer: Any, raw: bytes) -> Optional[RoundMeta]:
    """A groupmate's gathered entry (untrusted): hivemind's `[bandwidth, mode, user data]`, where the user data is our
    RoundMeta; None if anything is malformed or the member is not a full node."""
    try:
        entry = serializer.loads(raw)
        bandwidth, mode, user = entry
        meta = serializer.loads(user)
    except Exception:  # noqa: BLE001 (msgpack and unpacking raise many types on hostile bytes; all mean malformed)
        return None
    if bandwidth is not None and not isinstance(bandwidth, (int, float)):
        return None
    if type(mode) is not int or mode != AveragingMode.NODE.value:
        return None
    return RoundMeta.parse(meta)


def renew_torch_thread_pool() -> None:
    """Call first thing in a forked process that uses torch from several threads (the averager process).

    torch leaks its thread pool in a forked child and builds a new one on first use, without a lock: two threads that
    use torch for the first time at once (hivemind encodes parts in a thread pool) can find no pool at all, and the
    encoding fails with `RuntimeError: pool INTERNAL ASSERT FAILED ... Invalid thread pool!`; that part is never sent,
    and the round loses a span. Building it here, before any other thread runs, closes the race."""
    torch.set_num_threads(torch.get_num_threads())
