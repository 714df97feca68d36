"""What a reducer accepts from each sender, and the clip bound (comm/screening.py); no network."""

from __future__ import annotations

import math

import pytest
import torch
from hivemind.proto import runtime_pb2

from tapestry_p2p.comm.screening import Screen, clip_threshold, weight_for

CODEC = runtime_pb2.BLOCKWISE_8BIT


def screen(norms=(1.0, 2.0, 1.5), steps=(10, 10, 10), sizes=(4, 4)) -> Screen:
    return Screen(list(steps), list(norms), CODEC, max_steps=10, part_sizes=list(sizes))


def test_the_weight_is_the_declared_steps_at_most_h_never_zero():
    assert weight_for(7, 10) == 7.0 and weight_for(70, 10) == 10.0
    assert 0 < weight_for(0, 10) < 1e-5


def test_an_honest_part_is_accepted():
    s = screen()
    assert s.check(0, 0, torch.full((4,), 0.25), 10.0, CODEC) is None
    assert s.check(0, 1, torch.full((4,), 0.25), 10.0, CODEC) is None  # the span's norm so far: 0.707 <= 1.0


@pytest.mark.parametrize(
    "part,weight,codec,index,reason",
    [
        (torch.full((1,), 0.1), 10.0, CODEC, 0, "sent 1 values"),  # hivemind would broadcast it over the part
        (torch.full((4,), 0.1, dtype=torch.float64), 10.0, CODEC, 0, "float64"),
        (torch.full((4,), 0.1), 1e9, CODEC, 0, "sent weight 1e+09"),  # A1: a self-declared weight
        (torch.full((4,), 0.1), 10.0, runtime_pb2.NONE, 0, "codec #0"),  # A7: another codec
        (torch.tensor([0.1, float("nan"), 0.1, 0.1]), 10.0, CODEC, 0, "non-finite"),  # A5
        (torch.full((4,), 0.1), 10.0, CODEC, 5, "part #5"),
        (torch.full((4,), 10.0), 10.0, CODEC, 0, "more than its declared norm"),  # declared 1.0, sent 20
    ],
)
def test_a_malformed_or_lying_part_is_refused(part, weight, codec, index, reason):
    found = screen().check(0, index, part, weight, codec)
    assert found is not None and reason in found, found


def test_a_sender_is_clipped_to_k_times_the_lower_median_of_declared_norms():
    s = screen(norms=(1.0, 2.0, 1000.0))
    assert s.tau == 3.0 * 2.0  # the lower median of (1, 2, 1000) is 2: one liar cannot move it
    assert s.scale(0) == 1.0 and s.scale(1) == 1.0
    assert math.isclose(s.scale(2), 6.0 / 1000.0)
    assert clip_threshold([1.0, 1000.0], 3.0) == 3.0  # two senders: the smaller norm
    assert clip_threshold([], 3.0) == math.inf


def test_a_declared_norm_is_checked_across_the_whole_span():
    s = screen(norms=(1.0, 1.0, 1.0))
    assert s.check(1, 0, torch.full((4,), 0.4), 10.0, CODEC) is None  # 0.8
    assert "declared norm" in s.check(1, 1, torch.full((4,), 0.4), 10.0, CODEC)  # 0.8 + 0.8 in squares: 1.13
