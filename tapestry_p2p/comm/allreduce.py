"""Bit-exact butterfly all-reduce: hivemind's DecentralizedAverager with a reducer that publishes one result.

In stock hivemind each reducer keeps its own unquantized average while every other peer receives a quantized
*difference* from its own input, and adds it to its local tensor. Two peers' "averages" of one round therefore differ
(by up to 1% of the values with 8-bit codecs, and by ~1e-9 even uncompressed), and DiLoCo's shared model would drift
apart peer by peer. Here:

- the reducer of a part serializes the *average* of that part once, with the round's codec, and sends those same
  bytes to every sender; it decodes the same bytes for itself;
- every peer copies the decoded averages into its tensors (no `local + delta`).

So each member ends the round holding exactly the same float32 values, whatever the codec. Matchmaking, timeouts,
part splitting and load balancing stay hivemind's. The runner also counts the bytes of every message it sends and
receives, so a round's traffic is measured where it happens rather than estimated.

Each reducer screens what its senders send (`screening.Screen`: exact shape, codec and weight, finite values, a norm
within what the sender declared) and clips each sender to a bound relative to the group; a refused sender is banned
from this reducer for the round, and refusals and clips are reported per peer (`refused`, `clipped`).

When a reducer dies mid-round, the values it was averaging get *no* update this round on every member (a zero
pseudo-gradient), instead of hivemind's "keep your own values", which would leave each survivor with a different
model. The averager that runs this runner is `comm/averager.py`.

Two methods are forks of hivemind 1.1.12's `averaging/allreduce.py` (marked where they start); the other overrides
only wrap upstream's method.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# hivemind's servicer recognises streaming RPC handlers by typing.AsyncIterator only (not collections.abc's)
from typing import Any, AsyncIterator, Optional

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.p2p import P2PContext, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import amap_in_executor

from tapestry_p2p.comm.error_feedback import Recording, flat_ranges
from tapestry_p2p.comm.screening import Screen, weight_for

logger = logging.getLogger(__name__)

DIAL_STAGGER = 1.0  # seconds the larger peer id waits for a first connection (see _avoid_simultaneous_dial)

# What the network and hivemind's group logic raise through an all-reduce (a groupmate left, timed out, was banned);
# anything else raised inside our overrides is a bug, and is logged with its traceback.
NETWORK_FAILURES = (
    AllreduceException,
    MatchmakingException,
    P2PHandlerError,
    P2PDaemonError,
    ConnectionError,
    asyncio.TimeoutError,
    asyncio.CancelledError,
    asyncio.InvalidStateError,
    StopAsyncIteration,
)


@dataclass
class Traffic:
    """Bytes of all-reduce messages (serialized protobufs) one peer sent and received in one round."""

    sent: int = 0
    received: int = 0

    def add_sent(self, n: int) -> None:
        self.sent += n

    def add_received(self, n: int) -> None:
        self.received += n


async def _counted(stream: AsyncIterator[Any], add: Callable[[int], None]) -> AsyncIterator[Any]:
    async for message in stream:
        add(message.ByteSize())
        yield message


async def _received_all(stream: AsyncIterator[Any], expected: int, done: asyncio.Event) -> AsyncIterator[Any]:
    """A reducer's answers; `done` is set once `expected` averaged parts arrived, or the stream ended."""
    received = 0
    try:
        async for message in stream:
            received += message.code == averaging_pb2.AVERAGED_PART
            if received >= expected or message.code != averaging_pb2.AVERAGED_PART:  # all in, or a refusal
                done.set()
            yield message
    finally:
        done.set()


async def _until(inputs: AsyncIterator[Any], done: asyncio.Event) -> AsyncIterator[Any]:
    """Our parts for a reducer; the stream ends (END_OF_STREAM) only once `done`: we read every answer first."""
    async for message in inputs:
        yield message
    await done.wait()


async def _first(stream: AsyncIterator[Any], n: int) -> AsyncIterator[Any]:
    """The first `n` messages of a sender's stream, and not one read more: what follows is its end of stream, which it
    sends only once it read our last averaged part, so a reducer that read ahead would wait for it while the part is
    still being averaged (as long as a stalled or dead groupmate is waited for), time out there, and close the stream
    right after its last answer, before the sender read it (the "lost tail": p2pd's reset overtakes buffered data)."""
    if n <= 0:
        return
    received = 0
    async for message in stream:
        yield message
        received += 1
        if received == n:
            return


async def _end_of(stream: AsyncIterator[Any]) -> None:
    """Wait for a sender's end of stream once it has every averaged part of ours (the side that reads closes first);
    its timeout (sender_timeout, hivemind's wrapper of the stream) runs from our last answer. A sender that lags past
    it, or sends more, is closed on quietly: its span is complete."""
    try:
        await anext(stream)
        logger.debug("a sender sent more than its span: closing its stream")
    except (StopAsyncIteration, TimeoutError):
        pass


async def accumulate(
    reducer: TensorPartReducer, sender_index: int, part_index: int, part: torch.Tensor, weight: float
) -> torch.Tensor:
    """A sender's part into the reducer; its average once every sender's part is in. Shielded: the average is one
    future shared by every sender and our own part, a sender's handler is cancelled when that sender dies, and a task
    cancelled while it awaits a future cancels the future, for everyone (our own span lost its update whenever a
    groupmate was killed mid-round)."""
    return await asyncio.shield(reducer.accumulate_part(sender_index, part_index, part, weight=weight))


class _CountingStub:
    """Wraps a peer's RPC stub for `rpc_aggregate_part`: both directions are counted; opening the stream is bounded
    (hivemind 1.1.12 awaits it without a timeout, so a member whose groupmate died before answering would wait for the
    whole all-reduce timeout: tests/e2e/test_churn.py kills a peer mid-round); and our input ends only after we read
    the reducer's last averaged part.

    That last point is the "lost span" fix: a reducer's handler closes its stream when our input ends; p2pd then resets
    the stream, and go-yamux (inside p2pd) returns the reset to a reader *before* the data it buffered, so a reader
    that lagged lost the tail of the span ("sent k parts, but we expected n"). The side that reads closes first now.
    """

    def __init__(self, stub: Any, traffic: Traffic, open_timeout: Optional[float], expected_parts: int) -> None:
        self._stub, self._traffic, self._open_timeout = stub, traffic, open_timeout
        self._expected = expected_parts

    async def rpc_aggregate_part(
        self, inputs: AsyncIterator[averaging_pb2.AveragingData]
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        done = asyncio.Event()
        opening = self._stub.rpc_aggregate_part(_counted(_until(inputs, done), self._traffic.add_sent))
        stream = await asyncio.wait_for(opening, self._open_timeout)
        return _received_all(_counted(stream, self._traffic.add_received), self._expected, done)


class ExactAllReduceRunner(AllReduceRunner):
    """An AllReduceRunner whose outputs are the decoded averages, identical on every member of the group."""

    def __init__(self, screen: Screen, error_sink: Optional[Sequence[torch.Tensor]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        container = self.tensor_part_container
        self._codec = container.compression  # what averages are published with
        if error_sink is not None:  # error feedback: what our outgoing parts lose is written there
            container.compression = Recording(self._codec, error_sink)
        part_sizes = [math.prod(shape) for shape in self.tensor_part_reducer.part_shapes]
        self.screen = dataclasses.replace(screen, part_sizes=part_sizes)
        self.refused: dict[str, str] = {}  # sender (base58) -> why this reducer refused its parts this round
        self.clipped: dict[str, float] = {}  # sender (base58) -> the factor its parts were scaled by (< 1)
        container.return_deltas = False  # outputs are averages, not deltas; a failed reducer's span is zeroed later
        self.part_numels = [[part.numel() for part, _ in parts] for parts in container._input_parts_by_peer]
        self.span_sizes = [sum(numels) for numels in self.part_numels]
        self.failed_reducers: set[int] = set()
        register_failed = container.register_failed_reducer

        def register_failed_reducer(index: int) -> None:  # remember which spans to zero, then hivemind's bookkeeping
            self.failed_reducers.add(index)
            register_failed(index)

        container.register_failed_reducer = register_failed_reducer
        self.traffic = Traffic()
        self._published: dict[int, asyncio.Future] = {}
        self.span_published = asyncio.Event()  # every part of our span is averaged and encoded (`published_span`)
        # Senders whose results we still have to stream back. hivemind's runner finishes as soon as its *own*
        # outputs are in; a node that then shuts down (its last round) would cut its groupmates' results short.
        we_reduce = self.tensor_part_container.num_parts_by_peer[self.ordered_peer_ids.index(self.peer_id)] > 0
        self._unserved = {p for p in self.sender_peer_ids if p != self.peer_id} if we_reduce else set()
        self.all_served = asyncio.Event()
        if not self._unserved:
            self.all_served.set()

    def _get_peer_stub(self, peer: PeerID) -> _CountingStub:
        parts = self.tensor_part_container.num_parts_by_peer[self.ordered_peer_ids.index(peer)]
        return _CountingStub(super()._get_peer_stub(peer), self.traffic, self.sender_timeout, parts)

    async def served(self) -> None:
        """Wait until every groupmate we reduce for has read its averaged parts of our span (or was banned), at most
        `sender_timeout`: a node that shuts down after its last round must not cut its groupmates' results short."""
        try:
            await asyncio.wait_for(self.all_served.wait(), timeout=self.sender_timeout)
        except TimeoutError:
            logger.debug("some groupmates were not served their averaged parts in time")

    async def _ban_sender(self, peer_id: PeerID) -> None:
        """A banned sender gets nothing more from us: nothing to wait for (hivemind bans after sender_timeout)."""
        await super()._ban_sender(peer_id)
        self._mark_served(peer_id)

    def _mark_served(self, peer_id: PeerID) -> None:
        self._unserved.discard(peer_id)
        if not self._unserved:
            self.all_served.set()

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        try:
            async for message in super()._generate_input_for_peer(peer_index):
                yield message
        except BaseException as e:  # hivemind keeps this inside its writer task until the reply times out
            logger.debug("sending parts to peer #%d failed: %r", peer_index, e, exc_info=True)
            raise

    async def _avoid_simultaneous_dial(self, peer_id: PeerID) -> None:
        """Let the smaller peer id dial first when two groupmates are not connected yet.

        In a butterfly all-reduce every member opens a stream to every other at the same instant. Between two peers
        that never talked, both dials race (libp2p "simultaneous open", go-libp2p behind hivemind 1.1.12's p2pd) and
        one of the two streams can be lost: its sender waits for reducer_timeout and the round loses a part. Waiting
        briefly on one side lets the first connection be reused by the second stream (tests/test_swarm.py's first
        rounds are between peers that never talked).
        """
        if self.peer_id.to_bytes() < peer_id.to_bytes():
            return
        deadline = asyncio.get_running_loop().time() + DIAL_STAGGER
        while asyncio.get_running_loop().time() < deadline:
            if any(info.peer_id == peer_id for info in await self._p2p.list_peers()):
                return
            await asyncio.sleep(0.05)

    async def _publish(self, part_index: int, averaged_part: torch.Tensor) -> runtime_pb2.Tensor:
        """Encode the average of one part once; every sender (and this peer) gets these same bytes."""
        if part_index not in self._published:
            info = CompressionInfo.from_tensor(averaged_part)
            self._published[part_index] = asyncio.get_running_loop().run_in_executor(
                None, self._codec.compress, averaged_part, info, False
            )
        wire = await asyncio.shield(self._published[part_index])  # (shared: see _accumulate_parts_streaming)
        if len(self._published) == self.tensor_part_reducer.num_parts and all(
            f.done() for f in self._published.values()
        ):
            self.span_published.set()
        return wire

    def published_span(self) -> Optional[list[runtime_pb2.Tensor]]:
        """The encoded averages of our span's parts, as every member received them (None until all are published): a
        member that lost them in the all-reduce fetches them afterwards (`comm.losses`)."""
        if not self.span_published.is_set():
            return None
        return [self._published[i].result() for i in range(self.tensor_part_reducer.num_parts)]

    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        # forked from hivemind 1.1.12 averaging/allreduce.py:AllReduceRunner._communicate_with_peer, own-part branch
        # only; changes: our own part is weighted and clipped as our groupmates check it (declared steps, norm);
        # its average goes through `_publish` (encoded once, decoded like everyone's) instead
        # of `averaged - local`, and a failure registers our span as failed (upstream registers nothing there, so the
        # round would wait for the whole allreduce_timeout for a part that can no longer come).
        if peer_id != self.peer_id:
            await self._avoid_simultaneous_dial(peer_id)
            try:
                return await super()._communicate_with_peer(peer_id)
            except BaseException as e:  # hivemind logs this at debug level only; a lost span deserves a line
                if not isinstance(e, asyncio.CancelledError):  # cancelled: the round failed for another reason
                    logger.warning("lost the averaged span of groupmate %s this round: %r", peer_id.to_base58(), e)
                raise
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        try:
            scale = self._scale(sender_index)
            weight = weight_for(self.screen.declared_steps[sender_index], self.screen.max_steps)  # as others check it
            for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
                averaged = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part * scale if scale != 1.0 else tensor_part, weight=weight
                )
                wire = await self._publish(part_index, averaged)
                decoded = deserialize_torch_tensor(wire)
                self.tensor_part_container.register_processed_part(peer_index, part_index, decoded)
        except BaseException as e:  # e.g. cancelled when a groupmate dies mid-round
            if isinstance(e, Exception) and not isinstance(e, NETWORK_FAILURES):
                logger.exception("averaging our own part failed inside tapestry's runner (a bug, not the network)")
            logger.info("averaging our own part failed (%r): it gets no update this round", e)
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        stream = _counted(stream, self.traffic.add_received)
        try:
            async for message in super().rpc_aggregate_part(stream, context):
                self.traffic.add_sent(message.ByteSize())
                yield message
        finally:
            self._mark_served(context.remote_id)

    async def _accumulate_parts_streaming(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        # forked from hivemind 1.1.12 averaging/allreduce.py:AllReduceRunner._accumulate_parts_streaming; changes: each
        # part is screened (a refused sender is banned from this reducer for the round) and scaled by the sender's
        # clip factor; the reply is the part's published average (`_publish`: the same bytes for every sender)
        # instead of a delta re-encoded with the sender's codec. Kept from upstream: a banned sender's stream ends.
        part_index, num_parts = 0, self.tensor_part_reducer.num_parts
        scale = self._scale(sender_index)
        try:
            async for tensor_part, weight, codec in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.compression),
                _first(stream, num_parts),
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                refusal = self.screen.check(sender_index, part_index, tensor_part, weight, codec)
                if refusal is not None:
                    self._refuse(sender_index, refusal)
                    break
                try:
                    part = tensor_part * scale if scale != 1.0 else tensor_part
                    averaged = await accumulate(self.tensor_part_reducer, sender_index, part_index, part, weight)
                except BannedException:
                    logger.debug("sender #%d was banned in the meantime: its stream ends here", sender_index)
                    break
                wire = await self._publish(part_index, averaged)
                part_index += 1
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=wire)
            if part_index == num_parts:
                await _end_of(stream)
        finally:
            if part_index != num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    def _scale(self, sender_index: int) -> float:
        """The clip factor of a sender's parts at this reducer; clips are remembered for the round's report."""
        scale = self.screen.scale(sender_index)
        if scale < 1.0:
            self.clipped[self.sender_peer_ids[sender_index].to_base58()] = scale
        return scale

    def _refuse(self, sender_index: int, reason: str) -> None:
        peer = self.sender_peer_ids[sender_index].to_base58()
        self.refused.setdefault(peer, reason)
        logger.warning("refused the parts of groupmate %s this round: it %s", peer, reason)

    def spans_of(self, reducers: Sequence[int]) -> list[tuple[int, int]]:
        """[start, end) ranges, in the flattened order of the tensors, of these reducers' spans (by index)."""
        starts = [sum(self.span_sizes[:i]) for i in range(len(self.span_sizes))]
        return [(starts[i], starts[i] + self.span_sizes[i]) for i in sorted(reducers)]


@torch.no_grad()
def fill_span(tensors: Sequence[torch.Tensor], span: tuple[int, int], values: torch.Tensor) -> None:
    """Write `values` (flat, as long as the span) into the [start, end) range of the tensors' concatenated flat view."""
    offset = 0
    for index, lo, hi in flat_ranges([t.numel() for t in tensors], [span]):
        tensors[index].view(-1)[lo:hi] = values[offset : offset + hi - lo]
        offset += hi - lo


@torch.no_grad()
def zero_spans(tensors: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]]) -> int:
    """Zero the [start, end) ranges of the tensors' concatenated flat view; returns the number of values zeroed."""
    zeroed = 0
    for index, lo, hi in flat_ranges([t.numel() for t in tensors], spans):
        tensors[index].view(-1)[lo:hi] = 0
        zeroed += hi - lo
    return zeroed
