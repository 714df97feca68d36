"""State sync streams: the averager serves its shared state in slices and downloads slices from peers.

`StateTransport` is a mixin of `comm.averager.ExactAverager` (a hivemind DecentralizedAverager): its `rpc_state_slice`
is served through hivemind's p2p servicer under the averager's prefix, and the client calls run inside the averager
process, reached from the node's process through hivemind's pipe (`_call_in_averager`). Wire format: `wire.py`.

Limits (every byte is hostile): each request to a peer has an overall deadline, not only one per message; a server
may send at most the bytes of the tensors asked for (plus framing) before it is cut off; only members may ask for
our state (`security.membership`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

# hivemind's servicer recognises streaming RPC handlers by typing.AsyncIterator only (not collections.abc's)
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from tapestry_p2p.comm.statesync import policy
from tapestry_p2p.comm.statesync.wire import StateInfo, pack_request, unpack_request

logger = logging.getLogger(__name__)

PROGRESS_PERIOD = 2.0  # seconds between progress lines of a state download
PIPE_GRACE = 10.0  # extra seconds the node's process waits for the averager process to answer
MIN_DOWNLOAD_RATE = 1e6  # bytes/s: a server slower than this over a whole download is dropped (overall deadline)
FRAMING_BYTES = 4096  # per tensor: what a serialized, streamed tensor may carry beyond its float32 values
INFO_GRACE = 2.0  # seconds the other peers have to send their state info once the first one did (at least)


class _Progress:
    """Logs a state download's progress every PROGRESS_PERIOD seconds."""

    def __init__(self, total_bytes: int, servers: int) -> None:
        self.total, self.servers, self.done, self._last = total_bytes, servers, 0, time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self._last >= PROGRESS_PERIOD:
            self._last = time.monotonic()
            logger.info(
                "downloading the shared state: %.0f%% of %.1f MB from %d peers",
                100 * self.done / max(self.total, 1),
                self.total / 1e6,
                self.servers,
            )


Answer = tuple[Optional[StateInfo], list[torch.Tensor]]


class StateTransport:
    """Serving and downloading the shared state (mixed into a DecentralizedAverager; uses its p2p and pipe)."""

    if TYPE_CHECKING:  # provided by hivemind's DecentralizedAverager
        _p2p: Any
        _outer_pipe: Any
        _members: Any
        prefix: str
        schema_hash: bytes
        serializer: Any
        allow_state_sharing: bool

        async def _get_current_state_from_host_process(self) -> Any: ...

        _matchmaking: Any
        _state_updated: asyncio.Event
        dht: Any
        peer_id: PeerID
        declare_state_period: float
        state_sharing_priority: float

    # ---- advertising ----

    @property
    def advertised_key(self) -> str:
        """Where we advertise that we serve our state: hivemind's `all_averagers` key, per schema (changed from
        upstream: a peer of another run spec, codec or model could never average with us, and its state is not ours
        to download)."""
        return f"{self.prefix}.{self.schema_hash.hex()[:16]}.all_averagers"

    async def _declare_for_download_periodically(self) -> None:
        # forked from hivemind 1.1.12 averaging/averager.py:DecentralizedAverager._declare_for_download_periodically;
        # change: each declaration lives two periods, so the next one is stored before it expires. Upstream's expires
        # the moment the next one is sent: a joiner that reads the key in between (a DHT store takes a while under
        # load) finds one server fewer (tests/e2e/test_churn.py's late joiner once did); the key is per schema.
        download_key = self.advertised_key
        sharing_was_allowed = self.allow_state_sharing
        while True:
            if self.allow_state_sharing or sharing_was_allowed:
                store = self.dht.store(
                    download_key,
                    subkey=self.peer_id.to_bytes(),
                    value=self.state_sharing_priority if self.allow_state_sharing else None,
                    expiration_time=get_dht_time() + 2 * self.declare_state_period,
                    return_future=True,
                )
                asyncio.create_task(asyncio.wait_for(store, timeout=self.declare_state_period))
                sharing_was_allowed = self.allow_state_sharing
            self._state_updated.clear()  # declare again after a period, or as soon as our round changes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_updated.wait(), timeout=self.declare_state_period)

    # ---- server ----

    async def rpc_state_slice(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not self.allow_state_sharing:
            return
        if not self._members.allows(context.remote_id.to_base58()):
            logger.warning("refused a state request from %s: not a member of the consortium", context.remote_id)
            return
        metadata, tensors, _ = await self._get_current_state_from_host_process()
        metadata = self.serializer.loads(metadata)
        numel = tuple(t.numel() for t in tensors)
        info = StateInfo(
            int(metadata["round"]), str(metadata["hash"]), numel, bool(metadata["clean"]), bool(metadata["in_flight"])
        )
        yield averaging_pb2.DownloadData(metadata=info.pack())
        asked = unpack_request(request.metadata, len(tensors))
        if asked is None or (asked[0] is not None and asked[0] != info.hash):
            return
        for index in asked[1]:
            for part in split_for_streaming(serialize_torch_tensor(tensors[index].float())):
                yield averaging_pb2.DownloadData(tensor_part=part)

    # ---- client, called from the node's process ----

    def _call_in_averager(self, method: str, wait: Optional[float], **kwargs: Any) -> Any:
        """Run `method(**kwargs, future=...)` in the averager process; wait up to `wait` seconds (None: no limit)."""
        future: MPFuture = MPFuture()
        self._outer_pipe.send((method, [], dict(kwargs, future=future)))
        return future.result(timeout=wait)

    def state_infos(self, peers: Sequence[str], timeout: float) -> dict[str, StateInfo]:
        """What each of `peers` holds (round, hash, sizes); peers that do not answer in time are left out."""
        return self._call_in_averager(
            self._state_infos.__name__, timeout + PIPE_GRACE, peers=list(peers), timeout=timeout
        )

    def fetch_state(
        self, servers: Sequence[str], target: StateInfo, timeout: float
    ) -> Optional[tuple[list[torch.Tensor], list[str]]]:
        """Download the state `target` describes, its tensors split across `servers` (who all hold it).

        Returns the tensors and the servers that delivered, or None if they could not deliver it all.
        """
        deadline = download_deadline(target.nbytes, timeout)
        return self._call_in_averager(
            self._fetch_state.__name__, deadline + PIPE_GRACE, servers=list(servers), target=target, timeout=timeout
        )

    # ---- client, in the averager process ----

    async def _ask_for_state(
        self,
        peer: str,
        want: Optional[str],
        indices: Sequence[int],
        timeout: float,
        progress: Optional[_Progress],
        max_bytes: int = 0,
    ) -> Answer:
        """One request: the peer's info, then the tensors `indices` if it holds `want`. `timeout` bounds each message
        and `download_deadline(max_bytes, timeout)` the whole answer; more than `max_bytes` of tensors is refused."""
        return await asyncio.wait_for(
            self._read_answer(peer, want, indices, timeout, progress, max_bytes),
            download_deadline(max_bytes, timeout),
        )

    async def _read_answer(
        self,
        peer: str,
        want: Optional[str],
        indices: Sequence[int],
        timeout: float,
        progress: Optional[_Progress],
        max_bytes: int,
    ) -> Answer:
        stub = type(self).get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)  # type: ignore[attr-defined]
        request = runtime_pb2.ExpertRequest(metadata=pack_request(want, indices))
        stream = await asyncio.wait_for(stub.rpc_state_slice(request), timeout)
        info: Optional[StateInfo] = None
        tensors: list[torch.Tensor] = []
        parts: list[Any] = []
        received = 0
        async for message in aiter_with_timeout(stream, timeout=timeout):
            if info is None:
                info = StateInfo.unpack(message.metadata)
                if info is None:
                    return None, []
                continue
            received += len(message.tensor_part.buffer)
            if received > max_bytes:
                raise ValueError(f"peer {peer} sent more than the {max_bytes} bytes asked for")
            if message.tensor_part.dtype and parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                parts = []
            parts.append(message.tensor_part)
            if progress is not None:
                progress.add(len(message.tensor_part.buffer))
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        return info, tensors

    async def _state_infos(self, peers: list[str], timeout: float, future: MPFuture) -> None:
        """Every answering peer's state info: the first within `timeout`, the others within `info_grace` of it. A dead
        or stalled advertiser (its record outlives it by up to two periods) held every download for the whole
        timeout, while a swarm of short rounds moved past the state it elected: in an 8-partner soak two partners
        chased the swarm for two minutes, each download failing on servers that no longer held its state."""
        loop = asyncio.get_running_loop()
        asks = {asyncio.create_task(self._ask_for_state(p, None, [], timeout, None)): p for p in peers}
        started, pending = loop.time(), set(asks)
        deadline = started + timeout
        infos: dict[str, StateInfo] = {}
        while pending and loop.time() < deadline:
            done, pending = await asyncio.wait(
                pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                answer = task.exception() or task.result()
                if isinstance(answer, BaseException) or answer[0] is None:
                    logger.debug("no state info from %s: %r", asks[task], answer)
                    continue
                if not infos:  # the first answer: the others have a grace period from now
                    deadline = min(deadline, loop.time() + info_grace(loop.time() - started))
                infos[asks[task]] = answer[0]
        for task in pending:
            task.cancel()
        future.set_result(infos)

    async def _fetch_state(self, servers: list[str], target: StateInfo, timeout: float, future: MPFuture) -> None:
        got: dict[int, torch.Tensor] = {}
        delivered: list[str] = []
        progress = _Progress(target.nbytes, len(servers))
        todo = list(range(len(target.numel)))
        try:
            async with asyncio.timeout(download_deadline(target.nbytes, timeout)):
                await self._fetch_rounds(servers, target, timeout, todo, got, delivered, progress)
            future.set_result(None if todo else ([got[i] for i in range(len(target.numel))], delivered))
        except BaseException as e:
            if not future.done():
                future.set_exception(e)
            if not isinstance(e, Exception):
                raise

    async def _fetch_rounds(
        self,
        servers: list[str],
        target: StateInfo,
        timeout: float,
        todo: list[int],
        got: dict[int, torch.Tensor],
        delivered: list[str],
        progress: _Progress,
    ) -> None:
        """Ask the servers for their shares until every tensor in `todo` is in `got` (or no server is left)."""
        while todo and servers:
            plan = policy.assign(target.numel, servers, todo)
            answers = await asyncio.gather(
                *(
                    self._ask_for_state(s, target.hash, chosen, timeout, progress, _expected_bytes(target, chosen))
                    for s, chosen in plan.items()
                ),
                return_exceptions=True,
            )
            for (server, chosen), answer in zip(plan.items(), answers, strict=True):
                if _delivers(answer, target, chosen):
                    got.update(zip(chosen, answer[1], strict=True))  # type: ignore[index]
                    delivered.append(server)
                else:
                    reason = answer if isinstance(answer, BaseException) else "wrong state"
                    logger.info("peer %s did not serve its share of the state (%r); asking the others", server, reason)
                    servers = [s for s in servers if s != server]
            todo[:] = [i for i in todo if i not in got]


def info_grace(first_seconds: float) -> float:
    """How long the other peers have to send their state info once the first one answered after `first_seconds`:
    INFO_GRACE, or twice what the first took (a slow link, a loaded machine)."""
    return max(INFO_GRACE, 2 * first_seconds)


def download_deadline(nbytes: int, timeout: float) -> float:
    """The overall deadline of one answer of `nbytes` bytes: `timeout`, plus the time it takes at MIN_DOWNLOAD_RATE."""
    return timeout + nbytes / MIN_DOWNLOAD_RATE


def _expected_bytes(target: StateInfo, chosen: Sequence[int]) -> int:
    return sum(4 * target.numel[i] + FRAMING_BYTES for i in chosen)


def _delivers(answer: Answer | BaseException, target: StateInfo, chosen: list[int]) -> bool:
    """Whether a server's answer is the wanted state with exactly the tensor sizes asked for."""
    if isinstance(answer, BaseException) or answer[0] is None or answer[0].id != target.id:
        return False
    return [t.numel() for t in answer[1]] == [target.numel[i] for i in chosen]
