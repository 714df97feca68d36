"""A faulty or malicious groupmate, as a real peer: three averagers on real DHT nodes and p2pd daemons, one of which
sends a 1000x update, NaN, a false weight or a malformed declaration, declares and then stays silent, tells each peer
another view, forges a groupmate's declaration, and serves a state that claims round 1,000,000; and a real libp2p
peer that serves its state one small message every 8 seconds, for ever.

Each round asserts on values: what the honest members end with, against the honest average. The uncompressed codec
makes the expected values exact (up to float32 summation). The lies run in the liar's own averager process, chosen
through shared memory (`Liar.LIE`) before each round.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import threading
import time
from typing import Any, AsyncIterator  # (hivemind's servicer recognises typing's AsyncIterator only)

import pytest
import torch
from helpers import start_signed_dht
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_dht_time

from tapestry_p2p.comm.agreement import Contribution, Declaration, Outcome, Status, propose
from tapestry_p2p.comm.allreduce import ExactAllReduceRunner
from tapestry_p2p.comm.averager import AllReduceOutcome, ExactAverager
from tapestry_p2p.comm.averaging import NEXT_CHUNK_TIMEOUT, AveragingConfig, RoundMeta, SwarmAveraging
from tapestry_p2p.comm.matchmaking import Pace
from tapestry_p2p.comm.screening import DEFAULT_CLIP_MULTIPLE
from tapestry_p2p.comm.statesync.client import STATE_TIMEOUT
from tapestry_p2p.comm.statesync.wire import StateId, StateInfo, unpack_request
from tapestry_p2p.p2p.dht import DHTOptions, start_dht, stop_dht, visible_maddrs

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
SHAPES = [torch.Size([300, 400]), torch.Size([1000])]  # ~8 parts of 16k values: every member reduces some
H = 10


LIE = multiprocessing.Array("c", 32)  # the liar's lie of the moment (shared with its forked averager process)


class FaultyRunner(ExactAllReduceRunner):
    """With the lie "stall": sends its first part to each groupmate late (but in time), then nothing more, as a member
    stopped mid-all-reduce (SIGSTOP, a swapping host) until its groupmates ban it. With "drop": its stream to one live
    groupmate's reducer breaks before its parts went out, so it loses that span, which the others receive. With
    "withhold": as a reducer, it never answers the first honest groupmate, nor serves it its span afterwards."""

    async def _accumulate_parts_streaming(self, stream: Any, sender_index: int) -> Any:
        first_honest = [p for p in self.ordered_peer_ids if p != self.peer_id][0]
        if LIE.value == b"withhold" and self.sender_peer_ids[sender_index] == first_honest:
            raise ConnectionResetError("(test) withheld")
        async for message in super()._accumulate_parts_streaming(stream, sender_index):
            yield message

    async def _communicate_with_peer(self, peer_id: Any) -> None:
        others = [p for p in self.ordered_peer_ids if p != self.peer_id]
        if LIE.value == b"drop" and peer_id == others[0]:
            self.tensor_part_container.register_failed_reducer(self.ordered_peer_ids.index(peer_id))
            raise ConnectionResetError("(test) the stream to this reducer broke")
        await super()._communicate_with_peer(peer_id)

    async def _generate_input_for_peer(self, peer_index: int) -> Any:
        if LIE.value != b"stall":
            async for message in super()._generate_input_for_peer(peer_index):
                yield message
            return
        async for message in super()._generate_input_for_peer(peer_index):
            await asyncio.sleep(NEXT_CHUNK_TIMEOUT - 1.0)
            yield message
            await asyncio.sleep(3 * NEXT_CHUNK_TIMEOUT)  # (past the ban: its reducers end its stream first)
            return


class Liar(ExactAverager):
    """Our averager, with one thing changed (the lie in `LIE`)."""

    runner_class = FaultyRunner

    @property
    def lie(self) -> str:
        return LIE.value.decode()

    async def _allreduce(self, decided: Outcome, weight: float, pace: Pace) -> AllReduceOutcome:
        return await super()._allreduce(decided, 1e9 if self.lie == "weight" else weight, pace)

    async def _declare(self, declaration: Declaration, meeting: float) -> bool:
        key = self.declarations_key(declaration.round)
        if self.lie == "metadata":  # a declaration that is not one: the meeting is text
            value = {**declaration.pack(), "meeting": "[/] not a number"}
            await self.dht.store(key, value, meeting + 120, subkey=self._owner, return_future=True)
            return True
        in_time = await super()._declare(declaration, meeting)
        if self.lie == "forge":  # then each groupmate's declaration of another state: under its subkey, and ours
            await asyncio.sleep(max(0.0, meeting - self.timing.margin - get_dht_time() - 0.3))  # (theirs are in)
            found = await self.dht.get(key, latest=True, return_future=True)
            for subkey in found.value if found else {}:
                if subkey != self._owner:
                    victim = {**declaration.pack(), "peer": "someone else", "hash": "forged"}
                    await self.dht.store(key, victim, meeting + 120, subkey=subkey, return_future=True)
            for peer in self._members_seen(found):
                forged = {**declaration.pack(), "peer": peer, "hash": "forged"}
                await self.dht.store(key, forged, meeting + 120, subkey=self._owner, return_future=True)
            await super()._declare(declaration, meeting)  # (its own entry again, with the latest expiration)
        return in_time

    @staticmethod
    def _members_seen(found: Any) -> list[str]:
        return [entry.value["peer"] for entry in (found.value if found else {}).values() if "peer" in entry.value]

    async def _agree(self, declaration: Declaration, contribution: Contribution) -> Outcome:
        if self.lie == "silent":  # declare, then never vote nor answer
            await self._declare(declaration, declaration.meeting)
            await asyncio.sleep(max(0.0, declaration.meeting - get_dht_time()) + self.timing.longest)
            return Outcome(None, reason="lied")
        return await super()._agree(declaration, contribution)

    async def rpc_agree(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        if self.lie == "silent":
            await asyncio.sleep(3600)
        return await super().rpc_agree(request, context)

    async def rpc_span(  # (annotated as the protocol's: hivemind reads the handler's types from the class)
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if self.lie != "withhold":
            async for message in super().rpc_span(request, context):
                yield message

    def _status_for(self, state: Any, peer: str) -> Status:
        if self.lie != "views":
            return super()._status_for(state, peer)
        # to each peer: "I saw only you and me", and a vote for that group, holding every vote for it, forever
        me = self.peer_id.to_base58()
        members = {p: d for p, d in state.agreement.view.items() if p in (me, peer)}
        proposal = propose(self.schema_hash, members)
        ours = state.agreement.contribution
        members = proposal.members
        return Status("vote", 1, proposal.group_id, members, members, members, math.inf, contribution=ours)


class Misbehaving(SwarmAveraging):
    averager_class = Liar


def _honest_state() -> tuple[dict[str, Any], list[torch.Tensor]]:
    return {"round": 0, "hash": "honest", "clean": True, "in_flight": False}, [torch.ones(s) for s in SHAPES]


def _claims_round_a_million() -> tuple[dict[str, Any], list[torch.Tensor]]:
    return {"round": 1_000_000, "hash": "zeros", "clean": True, "in_flight": False}, [torch.zeros(s) for s in SHAPES]


@pytest.fixture(scope="module")
def group():
    with contextlib.ExitStack() as stack:
        boot = start_dht(DHTOptions(listen=LOOPBACK))
        stack.callback(stop_dht, boot)
        peers = []
        for i in range(3):
            dht, owner = start_signed_dht(stack, visible_maddrs(boot))
            cls, state = (Misbehaving, _claims_round_a_million) if i == 2 else (SwarmAveraging, _honest_state)
            peers.append(cls(dht, "byzantine", owner, AveragingConfig(SHAPES, "none", H), state))
            peers[-1].addresses = visible_maddrs(dht)  # for a test's own peer to dial it
            stack.callback(peers[-1].shutdown)
        peers[2].publish_round(1_000_000)
        for peer in peers[:2]:
            peer.publish_round(0)
        yield peers


@contextlib.contextmanager
def lying(lie: str):
    LIE.value = lie.encode()
    try:
        yield
    finally:
        LIE.value = b""


def average_together(peers, deltas) -> list:
    meeting = get_dht_time() + 3.0
    results: list[Any] = [None] * len(peers)

    def run(i: int) -> None:
        results[i] = peers[i].average(deltas[i], meeting, RoundMeta(round=0, hash="same", steps=H))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(peers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    return results


def deltas_with(attacker: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(len(attacker))
    honest = [[torch.randn(s, generator=generator) * 0.01 for s in SHAPES] for _ in range(2)]
    return [*honest, attacker]


def norm(tensors) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def assert_honest_agree(results) -> None:
    assert results[0].group_size == results[1].group_size
    assert results[0].members == results[1].members and results[0].group_id == results[1].group_id
    for a, b in zip(results[0].averaged, results[1].averaged, strict=True):
        assert torch.equal(a, b) and torch.isfinite(a).all()


def assert_honest_mean_without_the_liar(group, results, deltas) -> None:
    """The honest two averaged together, without the liar, in the round's agreement (attempt 2 at worst)."""
    assert_honest_agree(results)
    assert results[0].members == sorted(p.peer_id for p in group[:2])
    for k in range(len(SHAPES)):
        assert torch.allclose(results[0].averaged[k], (deltas[0][k] + deltas[1][k]) / 2, atol=1e-6)


def test_a_1000x_update_is_clipped_to_the_bound(group):
    deltas = deltas_with([torch.randn(s) * 10.0 for s in SHAPES])  # ~1000x the honest norm
    results = average_together(group, deltas)
    assert [r.group_size for r in results] == [3, 3, 3], [r.failure for r in results]
    assert_honest_agree(results)
    attacker = group[2].peer_id
    assert 0 < results[0].clipped[attacker] < 1e-2 and results[1].clipped[attacker] == results[0].clipped[attacker]
    norms = [norm(d) for d in deltas]
    tau = DEFAULT_CLIP_MULTIPLE * sorted(norms)[1]
    scale = tau / norms[2]
    for k in range(len(SHAPES)):
        expected = (deltas[0][k] + deltas[1][k] + deltas[2][k] * scale) / 3
        assert torch.allclose(results[0].averaged[k], expected, atol=1e-6)
    honest_mean = [(deltas[0][k] + deltas[1][k]) / 2 for k in range(len(SHAPES))]
    moved = norm([a - m for a, m in zip(results[0].averaged, honest_mean, strict=True)])
    assert moved <= (tau + norm(honest_mean)) / 3 + 1e-6  # at most a third of the bound away from the honest mean


def test_a_nan_update_contributes_nothing(group):
    deltas = deltas_with([torch.full(s, float("nan")) for s in SHAPES])
    results = average_together(group, deltas)
    assert [r.group_size for r in results] == [3, 3, 3]
    assert_honest_agree(results)
    for k in range(len(SHAPES)):
        expected = (deltas[0][k] + deltas[1][k]) / 2  # the NaN peer sent zeros at a negligible weight
        assert torch.allclose(results[0].averaged[k], expected, atol=1e-6)
        assert torch.isfinite(results[2].averaged[k]).all()  # the faulty peer gets the group's model too


def test_a_false_weight_is_refused_by_every_honest_reducer(group):
    with lying("weight"):
        deltas = deltas_with([torch.full(s, 0.5) for s in SHAPES])
        results = average_together(group, deltas)
    assert results[0].group_size == results[1].group_size == 3
    attacker = group[2].peer_id
    assert "sent weight 1e+09" in results[0].refused[attacker] and attacker in results[1].refused
    flat = [torch.cat([t.flatten() for t in r.averaged]) for r in results[:2]]
    assert torch.equal(flat[0], flat[1])
    honest = torch.cat([((deltas[0][k] + deltas[1][k]) / 2).flatten() for k in range(len(SHAPES))])
    norms = [norm(d) for d in deltas]
    scale = min(1.0, DEFAULT_CLIP_MULTIPLE * sorted(norms)[1] / norms[2])  # it clips itself like any sender
    all_three = torch.cat(
        [((deltas[0][k] + deltas[1][k] + deltas[2][k] * scale) / 3).flatten() for k in range(len(SHAPES))]
    )
    on_honest_spans = torch.isclose(flat[0], honest, atol=1e-6)
    on_its_own_span = torch.isclose(
        flat[0], all_three, atol=1e-6
    )  # its own reducer takes its part at its declared weight
    assert bool((on_honest_spans | on_its_own_span).all())
    assert 0.4 < on_honest_spans.float().mean() < 0.9  # the two honest reducers' spans (hivemind cuts at parts)


def test_a_malformed_declaration_leaves_its_sender_out_of_the_round(group):
    with lying("metadata"):
        deltas = deltas_with([torch.full(s, 0.5) for s in SHAPES])
        results = average_together(group, deltas)
    assert results[0].group_size == results[1].group_size == 2  # the honest two averaged without it
    assert_honest_mean_without_the_liar(group, results, deltas)
    assert results[2].left_out is not None and results[2].averaged == []  # (its own view had itself in it)


def test_a_member_that_declares_and_then_stays_silent_costs_one_round_of_agreement(group):
    deltas = deltas_with([torch.full(s, 0.5) for s in SHAPES])
    with lying("silent"):
        results = average_together(group, deltas)
    assert_honest_mean_without_the_liar(group, results, deltas)
    assert results[0].attempt == results[1].attempt == 2


def test_a_member_stalled_mid_allreduce_costs_the_others_nothing_but_its_parts(group):
    """Its reducers wait for its next part until they ban it (its parts are not in their averages), while they hold
    the honest senders' streams open: the honest ones lose nothing, and the stalled one, whose streams they ended,
    fetches their spans afterwards, so all three apply one average and no span is zeroed."""
    deltas = deltas_with([torch.randn(s) * 0.01 for s in SHAPES])
    with lying("stall"):
        results = average_together(group, deltas)
    assert [r.group_size for r in results[:2]] == [3, 3], [r.failure for r in results]
    assert_honest_agree(results)
    assert results[0].lost_reducers == results[1].lost_reducers == [], [r.failure for r in results]
    assert results[0].clean and results[1].clean and results[0].agreed_lost == results[1].agreed_lost == []
    assert results[0].failure == results[1].failure == "1 groupmates' parts never reached us"
    assert (
        results[2].lost_reducers and results[2].recovered == results[2].lost_reducers and results[2].agreed_lost == []
    )
    for k in range(len(SHAPES)):
        assert torch.equal(results[0].averaged[k], results[2].averaged[k])


def test_a_span_one_member_lost_is_fetched_from_its_reducer(group):
    """The liar loses a live reducer's span (the others receive it): it fetches the span from that reducer afterwards,
    and all three apply one average (found at RTT 150 ms: the one that lost a span ended on another model, and its
    re-sync download, twice the model at 20 Mbit/s, outlasted the round)."""
    deltas = deltas_with([torch.randn(s) * 0.01 for s in SHAPES])
    with lying("drop"):
        results = average_together(group, deltas)
    victim = results[2].lost_reducers[0]
    assert [r.group_size for r in results] == [3, 3, 3], [r.failure for r in results]
    assert [r.lost_reducers for r in results] == [[], [], [victim]], [r.failure for r in results]
    assert results[2].recovered == [victim] and all(r.agreed_lost == [] and r.clean for r in results)
    for k in range(len(SHAPES)):
        assert torch.equal(results[0].averaged[k], results[2].averaged[k])
    assert_honest_agree(results)


def test_a_span_withheld_from_one_member_gets_no_update_on_any_member(group):
    """The liar, as a reducer, answers one honest member nothing and will not serve it the span afterwards: that
    member says so, and every member zeroes that span (a split otherwise: the other honest one received it)."""
    deltas = deltas_with([torch.randn(s) * 0.01 for s in SHAPES])
    with lying("withhold"):
        results = average_together(group, deltas)
    liar = group[2].peer_id
    assert [r.group_size for r in results] == [3, 3, 3], [r.failure for r in results]
    assert [r.agreed_lost for r in results] == [[liar]] * 3 and all(r.clean for r in results)
    assert liar in results[0].lost_reducers + results[1].lost_reducers
    for k in range(len(SHAPES)):
        assert torch.equal(results[0].averaged[k], results[2].averaged[k])
    assert_honest_agree(results)
    flat = torch.cat([t.flatten() for t in results[0].averaged])
    assert 0 < int((flat == 0).sum()) < flat.numel()  # the liar's span only: the rest is averaged


def test_a_member_telling_each_peer_another_view_never_splits_the_honest_ones(group):
    deltas = deltas_with([torch.full(s, 0.5) for s in SHAPES])
    with lying("views"):
        results = average_together(group, deltas)
    # each honest peer sees the liar vote for another group: attempt 1 fails, and the liar, which never echoes, is
    # dropped at the echo's deadline (its view is one of three: it could not have dropped anybody)
    assert_honest_mean_without_the_liar(group, results, deltas)
    assert results[0].attempt == results[1].attempt == 2


def test_a_forged_declaration_of_a_groupmate_changes_nothing(group):
    """Declarations are owner-signed: one stored under a groupmate's subkey is refused by every DHT node, and one under
    the liar's own subkey that names a groupmate is not that groupmate's; the round goes on with the real ones."""
    deltas = deltas_with([torch.randn(s) * 0.01 for s in SHAPES])
    with lying("forge"):
        results = average_together(group, deltas)
    assert [r.group_size for r in results] == [3, 3, 3], [r.failure for r in results]
    assert_honest_agree(results)
    assert results[2].group_id == results[0].group_id
    norms = [norm(d) for d in deltas]  # every member's own declared norm: nobody was clipped
    assert max(norms) <= DEFAULT_CLIP_MULTIPLE * sorted(norms)[1] and results[0].clipped == {}
    for k in range(len(SHAPES)):
        expected = (deltas[0][k] + deltas[1][k] + deltas[2][k]) / 3
        assert torch.allclose(results[0].averaged[k], expected, atol=1e-6)


def test_a_peer_claiming_a_later_round_takes_nobody_over(group):
    assert group[0].highest_round_online() == 1_000_000  # it advertises round 1,000,000 ...
    assert group[0].download_state(min_round=1) is None  # ... but holds no majority: nothing is downloaded
    others = group[1].download_state(min_round=0)
    assert others is None  # two peers that disagree: no majority either way


class SlowStateServer:
    """A real libp2p peer (its own p2pd) with a handler in place of `rpc_state_slice`: it answers an info request at
    once (round 1,000,000), and a request for tensors with one 4-byte message every 8 s, for ever (S3 in the review:
    under the 10 s per-message timeout, so only an overall deadline ends it)."""

    def __init__(self, initial_peers: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.p2p: P2P = self._run(P2P.create(initial_peers=initial_peers, host_maddrs=LOOPBACK))
        name = "byzantine_avg::ExactAverager.rpc_state_slice"
        self._run(self.p2p.add_protobuf_handler(name, self._serve, runtime_pb2.ExpertRequest, stream_output=True))

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    async def _serve(self, request: runtime_pb2.ExpertRequest, _context: P2PContext) -> Any:
        numel = tuple(s.numel() for s in SHAPES) * 2
        yield averaging_pb2.DownloadData(metadata=StateInfo(1_000_000, "zeros", numel).pack())
        asked = unpack_request(request.metadata, len(numel))
        while asked and asked[1]:
            await asyncio.sleep(8.0)
            yield averaging_pb2.DownloadData(tensor_part=runtime_pb2.Tensor(buffer=bytes(4), dtype="float32"))

    def close(self) -> None:
        self._run(self.p2p.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def test_a_slow_state_server_delays_a_download_but_never_stops_the_node(group):
    honest = group[0]
    server = SlowStateServer(honest.addresses[:1])
    try:
        started = time.monotonic()
        result = honest.download_state(0, peers=[server.p2p.peer_id.to_base58()], want=StateId(1_000_000, "zeros"))
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert result is None  # refused, not raised
    assert elapsed < 3 * STATE_TIMEOUT, elapsed  # the overall deadline (10 s + size at 1 MB/s), not for ever
