"""The pure part of the bit-exact all-reduce (comm/allreduce.py): zeroing a failed reducer's span."""

from __future__ import annotations

import torch

from tapestry_p2p.comm.allreduce import zero_spans


def test_a_failed_reducers_span_is_zeroed_across_tensor_boundaries():
    tensors = [torch.ones(2, 3), torch.ones(4)]
    assert zero_spans(tensors, [(4, 8)]) == 4  # the last 2 values of the first tensor, the first 2 of the second
    assert tensors[0].flatten().tolist() == [1, 1, 1, 1, 0, 0] and tensors[1].tolist() == [0, 0, 1, 1]
