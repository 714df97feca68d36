"""The parts of the bit-exact all-reduce (comm/allreduce.py) that need no network: zeroing a failed reducer's span,
a reducer whose sender dies mid-part, and the order in which a reducer reads a sender's stream and answers it."""

from __future__ import annotations

import asyncio
import types

import torch
from hivemind.averaging.partition import TensorPartReducer
from hivemind.compression import NoCompression, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import averaging_pb2, runtime_pb2

from tapestry_p2p.comm.allreduce import ExactAllReduceRunner, accumulate, zero_spans
from tapestry_p2p.comm.screening import Screen


def test_a_failed_reducers_span_is_zeroed_across_tensor_boundaries():
    tensors = [torch.ones(2, 3), torch.ones(4)]
    assert zero_spans(tensors, [(4, 8)]) == 4  # the last 2 values of the first tensor, the first 2 of the second
    assert tensors[0].flatten().tolist() == [1, 1, 1, 1, 0, 0] and tensors[1].tolist() == [0, 0, 1, 1]


def test_a_sender_that_dies_while_its_part_waits_does_not_cancel_the_average_for_the_others():
    async def scenario() -> torch.Tensor:
        reducer = TensorPartReducer([torch.Size([4])], num_senders=2)
        dying = asyncio.create_task(accumulate(reducer, 0, 0, torch.full((4,), 1.0), 1.0))
        await asyncio.sleep(0)  # (its part is in; it waits for the other sender's)
        dying.cancel()  # its handler goes, as when its peer is killed
        return await accumulate(reducer, 1, 0, torch.full((4,), 3.0), 1.0)

    assert asyncio.run(scenario()).tolist() == [2.0] * 4


class SenderStream:
    """A sender's parts for one reducer, then its end of stream, which (as ours) it sends only once it read every
    answer, or fails as hivemind's per-message timeout does (`timeout`) if the reducer asks for it before answering."""

    def __init__(self, parts: list[torch.Tensor], events: list[str], name: str, start: asyncio.Event, timeout: float):
        self.messages = [
            averaging_pb2.AveragingData(
                tensor_part=serialize_torch_tensor(p, runtime_pb2.CompressionType.NONE), weight=10
            )
            for p in parts
        ]  # (weight: the declared 10 steps)
        self.events, self.name, self.start, self.timeout = events, name, start, timeout
        self.answered = asyncio.Event()  # set by the test once this sender has every answer

    def __aiter__(self) -> SenderStream:
        return self

    async def __anext__(self) -> averaging_pb2.AveragingData:
        await self.start.wait()
        if self.messages:
            return self.messages.pop(0)
        self.events.append(f"{self.name} asked for the end")
        try:
            await asyncio.wait_for(self.answered.wait(), self.timeout)
        except TimeoutError:
            self.events.append(f"{self.name} timed out")
            raise
        raise StopAsyncIteration


def a_reducer(num_senders: int, num_parts: int) -> ExactAllReduceRunner:
    """The reducer's half of a runner (no network): a real TensorPartReducer, screen and codec."""
    runner = ExactAllReduceRunner.__new__(ExactAllReduceRunner)
    runner.tensor_part_reducer = TensorPartReducer([torch.Size([4])] * num_parts, num_senders=num_senders)
    runner.tensor_part_container = types.SimpleNamespace(prefetch=1)
    runner.screen = Screen(
        [10] * num_senders, [10.0] * num_senders, runtime_pb2.CompressionType.NONE, 10, part_sizes=[4] * num_parts
    )
    runner._codec, runner._published, runner.clipped = NoCompression(), {}, {}
    runner.span_published = asyncio.Event()
    return runner


def test_a_reducer_asks_for_a_senders_end_only_after_its_last_answer_even_while_a_groupmate_stalls():
    """The "lost tail" seen in the soak: a reducer that read ahead for a sender's end of stream while it waited for a
    stalled groupmate timed out there, then closed the stream right after its last answer, before the sender read it."""

    async def scenario() -> tuple[list[str], list[float]]:
        runner, events = a_reducer(num_senders=2, num_parts=3), []
        prompt, stalled = asyncio.Event(), asyncio.Event()
        prompt.set()
        fast = SenderStream([torch.full((4,), 1.0)] * 3, events, "fast", prompt, timeout=0.2)
        slow = SenderStream([torch.full((4,), 3.0)] * 3, events, "slow", stalled, timeout=5.0)
        answers: list[float] = []

        async def serve(stream: SenderStream, index: int) -> None:
            async for message in runner._accumulate_parts_streaming(stream, index):
                if index == 0:
                    answers.append(deserialize_torch_tensor(message.tensor_part)[0].item())
                    events.append("answer to fast")
                    if len(answers) == 3:
                        stream.answered.set()  # (it read them all: its end of stream is on its way)
            stream.events.append(f"{stream.name}'s stream closed")

        tasks = [asyncio.create_task(serve(fast, 0)), asyncio.create_task(serve(slow, 1))]
        await asyncio.sleep(0.5)  # the groupmate stalls, past the fast sender's timeout
        stalled.set()
        slow.answered.set()
        await asyncio.gather(*tasks)
        return events, answers

    events, answers = asyncio.run(scenario())
    assert answers == [2.0, 2.0, 2.0]
    fast = [e for e in events if "fast" in e]
    assert fast == ["answer to fast"] * 3 + ["fast asked for the end", "fast's stream closed"], events
