"""A groupmate's first part meets our averager's handler (`ExactAverager.rpc_aggregate_part`) on a fake averager: a
part of a group we commit while it waits is served by our round's runner, a part of a group we do not commit is
refused at once (BAD_GROUP_ID)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import as_aiter

from tapestry_p2p.comm.averager import ExactAverager
from tapestry_p2p.comm.voting import GroupVoting

GROUP = b"group-of-round-7"


class EchoRunner:
    """Our round's all-reduce runner, reduced to answering each part with its own group id."""

    async def rpc_aggregate_part(self, stream, context):
        async for message in stream:
            yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, group_id=message.group_id)


class FakeAverager:
    """The handler and `_expect_parts` as the averager has them; the vote is decided by the test."""

    rpc_aggregate_part = ExactAverager.rpc_aggregate_part
    _expect_parts = GroupVoting._expect_parts

    def __init__(self, commits: bool) -> None:
        self.timing = SimpleNamespace(ask_timeout=1.0)
        self._running_groups: dict[bytes, asyncio.Future] = {}
        self.commits = commits
        self.decided = asyncio.Event()
        self.asked: list[bytes] = []

    def _admits(self, context, what: str) -> bool:
        return True

    async def _decision(self, group_id: bytes) -> bool:
        self.asked.append(group_id)
        await self.decided.wait()  # (our vote for that group goes on)
        return self.commits


async def _answers(averager: FakeAverager, round_registers_after_the_handler: bool) -> list[int]:
    parts = [averaging_pb2.AveragingData(group_id=GROUP) for _ in range(2)]
    handler = asyncio.ensure_future(_collect(averager.rpc_aggregate_part(as_aiter(*parts), SimpleNamespace())))
    while not averager.asked:  # the first part is in: the handler waits for our decision
        await asyncio.sleep(0)
    averager.decided.set()
    if round_registers_after_the_handler:
        while GROUP not in averager._running_groups and not handler.done():  # the handler resumes first
            await asyncio.sleep(0)
        if not handler.done():  # our round's commit comes through: it registers the group and builds its runner
            averager._expect_parts(GROUP)
            averager._running_groups[GROUP].set_result(EchoRunner())
    return [message.code for message in await handler]


async def _collect(stream) -> list:
    return [message async for message in stream]


def test_a_part_of_the_group_we_commit_while_it_waits_reaches_our_runner_though_our_round_registers_it_later():
    """The race a soak saw: our vote commits, the waiting handler resumes before our round registers the group."""
    averager = FakeAverager(commits=True)
    answers = asyncio.run(_answers(averager, round_registers_after_the_handler=True))
    assert averager.asked == [GROUP]
    assert answers == [averaging_pb2.AVERAGED_PART, averaging_pb2.AVERAGED_PART]


def test_a_part_of_a_group_we_do_not_commit_is_refused_at_its_first_message():
    averager = FakeAverager(commits=False)
    answers = asyncio.run(_answers(averager, round_registers_after_the_handler=False))
    assert answers == [averaging_pb2.BAD_GROUP_ID]
    assert GROUP not in averager._running_groups  # (nothing waits for a runner that never comes)
