"""The parts of the bit-exact all-reduce (comm/allreduce.py) that need no network: zeroing a failed reducer's span,
and a reducer whose sender dies mid-part."""

from __future__ import annotations

import asyncio

import torch
from hivemind.averaging.partition import TensorPartReducer

from tapestry_p2p.comm.allreduce import accumulate, zero_spans


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
