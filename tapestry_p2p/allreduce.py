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

When a reducer dies mid-round, the values it was averaging get *no* update this round on every member (a zero
pseudo-gradient), instead of hivemind's "keep your own values", which would leave each survivor with a different
model. The averager also serves and downloads the shared state in slices (see `statesync`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging import matchmaking as hivemind_matchmaking
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, as_aiter, azip
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from tapestry_p2p import codec, statesync
from tapestry_p2p.processes import die_with_parent, keep_tasks_alive, keeping_sigint_handler

logger = logging.getLogger(__name__)

DIAL_STAGGER = 1.0  # seconds the larger peer id waits for a first connection (see _avoid_simultaneous_dial)
PROGRESS_PERIOD = 2.0  # seconds between progress lines of a state download
# Fault injection for tests and the churn soak: "N" makes this node SIGKILL itself during its N-th all-reduce, right
# after it has served one averaged part to a groupmate (so the groupmates see a reducer die mid-stream).
CRASH_ENV = "TAPESTRY_CRASH_IN_ALLREDUCE"

codec.register()  # before hivemind forks the averager process, so both ends decode our 8-bit format


@dataclass
class Traffic:
    """Bytes of all-reduce messages (serialized protobufs) one peer sent and received in one round."""

    sent: int = 0
    received: int = 0


async def _counted(stream: AsyncIterator[Any], add: Callable[[int], None]) -> AsyncIterator[Any]:
    async for message in stream:
        add(message.ByteSize())
        yield message


class _CountingStub:
    """Wraps a peer's RPC stub so that both directions of `rpc_aggregate_part` are counted, and opening the stream
    is bounded: hivemind waits for it without a timeout, and we saw a member wait there for the whole all-reduce
    timeout after a groupmate was killed mid-round, while the rest of its group had long moved on."""

    def __init__(self, stub: Any, traffic: Traffic, open_timeout: Optional[float]):
        self._stub, self._traffic, self._open_timeout = stub, traffic, open_timeout

    async def rpc_aggregate_part(self, inputs: AsyncIterator[averaging_pb2.AveragingData]):
        opening = self._stub.rpc_aggregate_part(_counted(inputs, self._add_sent))
        stream = await asyncio.wait_for(opening, self._open_timeout)
        return _counted(stream, self._add_received)

    def _add_sent(self, n: int) -> None:
        self._traffic.sent += n

    def _add_received(self, n: int) -> None:
        self._traffic.received += n


class ExactAllReduceRunner(AllReduceRunner):
    """An AllReduceRunner whose outputs are the decoded averages, identical on every member of the group."""

    def __init__(self, crash: bool = False, **kwargs):
        super().__init__(**kwargs)
        container = self.tensor_part_container
        container.return_deltas = False  # outputs are averages, not deltas; a failed reducer's span is zeroed later
        self.span_sizes = [sum(part.numel() for part, _ in parts) for parts in container._input_parts_by_peer]
        self.failed_reducers: Set[int] = set()
        register_failed = container.register_failed_reducer
        container.register_failed_reducer = lambda index: (self.failed_reducers.add(index), register_failed(index))
        self._crash = crash
        self.traffic = Traffic()
        self._published: Dict[int, asyncio.Future] = {}
        # Senders whose results we still have to stream back. hivemind's runner finishes as soon as its *own*
        # outputs are in; a node that then shuts down (its last round) would cut its groupmates' results short.
        we_reduce = self.tensor_part_container.num_parts_by_peer[self.ordered_peer_ids.index(self.peer_id)] > 0
        self._unserved = {p for p in self.sender_peer_ids if p != self.peer_id} if we_reduce else set()
        self.all_served = asyncio.Event()
        if not self._unserved:
            self.all_served.set()

    def _get_peer_stub(self, peer):
        return _CountingStub(super()._get_peer_stub(peer), self.traffic, open_timeout=self.sender_timeout)

    async def _generate_input_for_peer(self, peer_index: int):
        try:
            async for message in super()._generate_input_for_peer(peer_index):
                yield message
        except BaseException as e:  # hivemind keeps this inside its writer task until the reply times out
            logger.debug("sending parts to peer #%d failed: %r", peer_index, e, exc_info=True)
            raise

    async def _avoid_simultaneous_dial(self, peer_id) -> None:
        """Let the smaller peer id dial first when two groupmates are not connected yet.

        In a butterfly all-reduce every member opens a stream to every other at the same instant. Between two peers
        that never talked, both dials race (libp2p "simultaneous open") and one of the two streams was lost in about
        one first round in three on our loopback tests: its sender waited for reducer_timeout and the round lost a
        part. Waiting briefly on one side lets the first connection be reused by the second stream.
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
            compression = self.tensor_part_container.compression
            info = CompressionInfo.from_tensor(averaged_part)
            self._published[part_index] = asyncio.get_running_loop().run_in_executor(
                None, compression.compress, averaged_part, info, False
            )
        return await self._published[part_index]

    async def _communicate_with_peer(self, peer_id):
        if peer_id != self.peer_id:
            await self._avoid_simultaneous_dial(peer_id)
            return await super()._communicate_with_peer(peer_id)
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        try:
            for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
                averaged = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part, weight=self.weight
                )
                wire = await self._publish(part_index, averaged)
                decoded = deserialize_torch_tensor(wire)
                self.tensor_part_container.register_processed_part(peer_index, part_index, decoded)
        except BaseException as e:
            # e.g. cancelled when a groupmate dies mid-round. hivemind registers nothing here, so the round used to
            # wait for the whole allreduce_timeout (60 s) for a part that could no longer come.
            logger.info("averaging our own part failed (%r): it gets no update this round", e)
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    async def rpc_aggregate_part(self, stream, context: P2PContext):
        stream = _counted(stream, lambda n: setattr(self.traffic, "received", self.traffic.received + n))
        try:
            async for message in super().rpc_aggregate_part(stream, context):
                self.traffic.sent += message.ByteSize()
                yield message
                if self._crash:
                    logger.warning("%s is set: killing this node in the middle of an all-reduce", CRASH_ENV)
                    os.kill(os.getppid(), signal.SIGKILL)  # the node; its other children die with it (PDEATHSIG)
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            self._unserved.discard(context.remote_id)
            if not self._unserved:
                self.all_served.set()

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        part_index = 0
        try:
            async for tensor_part, weight in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                averaged = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part, weight=weight
                )
                wire = await self._publish(part_index, averaged)
                part_index += 1
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=wire)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    def failed_spans(self) -> List[Tuple[int, int]]:
        """[start, end) ranges, in the flattened order of the tensors, of the reducers that failed this round."""
        starts = [sum(self.span_sizes[:i]) for i in range(len(self.span_sizes))]
        return [(starts[i], starts[i] + self.span_sizes[i]) for i in sorted(self.failed_reducers)]


@torch.no_grad()
def zero_spans(tensors: Sequence[torch.Tensor], spans: Sequence[Tuple[int, int]]) -> int:
    """Zero the [start, end) ranges of the tensors' concatenated flat view; returns the number of values zeroed."""
    zeroed, offset = 0, 0
    for tensor in tensors:
        flat = tensor.view(-1)
        for start, end in spans:
            lo, hi = max(start - offset, 0), min(end - offset, flat.numel())
            if lo < hi:
                flat[lo:hi] = 0
                zeroed += hi - lo
        offset += flat.numel()
    return zeroed


class _Progress:
    """Logs a state download's progress every PROGRESS_PERIOD seconds."""

    def __init__(self, total_bytes: int, servers: int):
        self.total, self.servers, self.done, self._last = total_bytes, servers, 0, time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self._last >= PROGRESS_PERIOD:
            self._last = time.monotonic()
            logger.info(
                "downloading the shared state: %.0f%% of %.1f MB from %d peers",
                100 * self.done / max(self.total, 1), self.total / 1e6, self.servers,
            )  # fmt: skip


class _RateLimitedKeys:
    """A GroupKeyManager proxy that answers `get_averagers` at most once per `interval` seconds."""

    def __init__(self, key_manager: Any, interval: float):
        self._key_manager, self._interval, self._last = key_manager, interval, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._key_manager, name)

    async def get_averagers(self, *args, **kwargs):
        await asyncio.sleep(max(0.0, self._last + self._interval - time.monotonic()))
        self._last = time.monotonic()
        return await self._key_manager.get_averagers(*args, **kwargs)


class _PoliteLeaders(hivemind_matchmaking.PotentialLeaders):
    """hivemind's leader queue, refreshed from the DHT at most twice a second.

    Stock hivemind refreshes it in a tight loop while a peer waits for groupmates: measured on loopback, one waiting
    peer moved ~1.2 MB/s of DHT requests, 2-3x the payload of a small model's round.
    """

    REFRESH_INTERVAL = 0.5

    async def _update_queue_periodically(self, key_manager) -> None:
        await super()._update_queue_periodically(_RateLimitedKeys(key_manager, self.REFRESH_INTERVAL))


@dataclass
class RoundOutcome:
    """What one all-reduce returns to the training process (pickled across the averager's process boundary)."""

    gathered: Dict[str, Any]  # peer id (base58) -> the metadata that peer passed as `gather`
    bytes_sent: int
    bytes_received: int
    failed_fraction: float  # share of values whose reducer failed (those values get no update this round)
    senders_lost: int  # groupmates whose parts never reached us as a reducer (our span averages the others')


class ExactAverager(DecentralizedAverager):
    """DecentralizedAverager with ExactAllReduceRunner, traffic accounting and a pluggable shared state.

    :param state_fn: called in the host process when a peer downloads our state (`load_state_from_peers`); returns
      `(metadata, tensors)`. None disables state sharing.
    Other arguments are DecentralizedAverager's.
    """

    def __init__(self, *args, state_fn: Optional[Callable[[], Tuple[Any, Sequence[torch.Tensor]]]] = None, **kwargs):
        self._state_fn = state_fn
        self._last_traffic = Traffic()
        self._last_failed_fraction = 0.0
        self._last_senders_lost = 0
        self._allreduces = 0
        crash_at = os.environ.get(CRASH_ENV, "")
        self._crash_at = int(crash_at) if crash_at.isdigit() else None
        super().__init__(*args, allow_state_sharing=state_fn is not None, **kwargs)

    def run_in_background(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        keeping_sigint_handler(lambda: super(ExactAverager, self).run_in_background(await_ready, timeout))

    def run(self):
        die_with_parent()
        keep_tasks_alive()
        hivemind_matchmaking.PotentialLeaders = _PoliteLeaders  # this averager process only
        # a round without a group is reported by the node; hivemind would log it as an error with a traceback
        logging.getLogger("hivemind.averaging.averager").setLevel(logging.CRITICAL)
        super().run()

    def get_current_state(self):
        metadata, tensors = self._state_fn()
        return metadata, tensors, None

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs) -> RoundOutcome:
        gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        traffic = self._last_traffic
        return RoundOutcome(
            gathered={peer.to_base58(): data for peer, data in gathered.items()},
            bytes_sent=traffic.sent,
            bytes_received=traffic.received,
            failed_fraction=self._last_failed_fraction,
            senders_lost=self._last_senders_lost,
        )

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: Optional[bytes] = None, **kwargs
    ):
        group_id = group_info.group_id if group_id is None else group_id
        self._allreduces += 1
        runner = ExactAllReduceRunner(
            crash=self._allreduces == self._crash_at,
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        self._last_traffic = runner.traffic
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            raise ValueError("tapestry peers always contribute to the average; auxiliary mode is not supported")
        async for tensor, averaged in azip(as_aiter(*tensors), runner):
            tensor.copy_(averaged)
        try:  # senders that never show up are banned by hivemind after sender_timeout; don't wait longer than that
            await asyncio.wait_for(runner.all_served.wait(), timeout=runner.sender_timeout)
        except asyncio.TimeoutError:
            logger.debug("some groupmates were not served their averaged parts in time")
        # A reducer that failed may have sent part of its span to some members and not to others; nobody uses any of
        # it, so all survivors end the round with the same values.
        zeroed = zero_spans(tensors, runner.failed_spans())
        self._last_failed_fraction = zeroed / max(runner.tensor_part_container.total_size, 1)
        self._last_senders_lost = sum(after != float("inf") for after in runner.tensor_part_reducer.sender_failed_after)

    # ---- the shared state, served and downloaded in slices (see statesync) ----

    async def rpc_state_slice(
        self, request: runtime_pb2.ExpertRequest, _context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not self.allow_state_sharing:
            return
        metadata, tensors, _ = await self._get_current_state_from_host_process()
        metadata = self.serializer.loads(metadata)
        numel = tuple(t.numel() for t in tensors)
        info = statesync.StateInfo(int(metadata["round"]), str(metadata["hash"]), numel, bool(metadata["clean"]))
        yield averaging_pb2.DownloadData(metadata=info.pack())
        asked = statesync.unpack_request(request.metadata, len(tensors))
        if asked is None or (asked[0] is not None and asked[0] != info.hash):
            return
        for index in asked[1]:
            for part in split_for_streaming(serialize_torch_tensor(tensors[index].float())):
                yield averaging_pb2.DownloadData(tensor_part=part)

    async def _ask_for_state(
        self, peer: str, want: Optional[str], indices: Sequence[int], timeout: float, progress: Optional[_Progress]
    ) -> Tuple[Optional[statesync.StateInfo], List[torch.Tensor]]:
        stub = type(self).get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
        request = runtime_pb2.ExpertRequest(metadata=statesync.pack_request(want, indices))
        stream = await asyncio.wait_for(stub.rpc_state_slice(request), timeout)
        info, tensors, parts = None, [], []
        async for message in aiter_with_timeout(stream, timeout=timeout):
            if info is None:
                info = statesync.StateInfo.unpack(message.metadata)
                if info is None:
                    return None, []
                continue
            if message.tensor_part.dtype and parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                parts = []
            parts.append(message.tensor_part)
            if progress is not None:
                progress.add(len(message.tensor_part.buffer))
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        return info, tensors

    def state_infos(self, peers: Sequence[str], timeout: float) -> Dict[str, statesync.StateInfo]:
        """What each of `peers` holds (round, hash, sizes); peers that do not answer in time are left out."""
        future = MPFuture()
        self._outer_pipe.send(("_state_infos", [], dict(peers=list(peers), timeout=timeout, future=future)))
        return future.result(timeout=timeout + 10)

    async def _state_infos(self, peers: List[str], timeout: float, future: MPFuture) -> None:
        answers = await asyncio.gather(
            *(self._ask_for_state(peer, None, [], timeout, None) for peer in peers), return_exceptions=True
        )
        infos = {}
        for peer, answer in zip(peers, answers):
            if isinstance(answer, BaseException) or answer[0] is None:
                logger.debug("no state info from %s: %r", peer, answer)
            else:
                infos[peer] = answer[0]
        future.set_result(infos)

    def fetch_state(
        self, servers: Sequence[str], target: statesync.StateInfo, timeout: float
    ) -> Optional[Tuple[List[torch.Tensor], List[str]]]:
        """Download the state `target` describes, its tensors split across `servers` (who all hold it).

        Returns the tensors and the servers that delivered, or None if they could not deliver it all.
        """
        future = MPFuture()
        kwargs = dict(servers=list(servers), target=target, timeout=timeout, future=future)
        self._outer_pipe.send(("_fetch_state", [], kwargs))
        return future.result()

    async def _fetch_state(
        self, servers: List[str], target: statesync.StateInfo, timeout: float, future: MPFuture
    ) -> None:
        got: Dict[int, torch.Tensor] = {}
        delivered: List[str] = []
        progress = _Progress(target.nbytes, len(servers))
        todo = list(range(len(target.numel)))
        try:
            while todo and servers:
                plan = statesync.assign(target.numel, servers, todo)
                answers = await asyncio.gather(
                    *(self._ask_for_state(s, target.hash, chosen, timeout, progress) for s, chosen in plan.items()),
                    return_exceptions=True,
                )
                for (server, chosen), answer in zip(plan.items(), answers):
                    shapes_ok = not isinstance(answer, BaseException) and [t.numel() for t in answer[1]] == [
                        target.numel[i] for i in chosen
                    ]
                    if shapes_ok and answer[0] is not None and answer[0].id == target.id:
                        got.update(zip(chosen, answer[1]))
                        delivered.append(server)
                    else:
                        logger.info(
                            "peer %s did not serve its share of the state (%r); asking the others",
                            server,
                            answer if isinstance(answer, BaseException) else "wrong state",
                        )
                        servers = [s for s in servers if s != server]
                todo = [i for i in todo if i not in got]
            future.set_result(None if todo else ([got[i] for i in range(len(target.numel))], delivered))
        except BaseException as e:
            if not future.done():
                future.set_exception(e)
            raise
