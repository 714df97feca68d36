"""Error feedback (comm/error_feedback.py): what a partner's parts lose on the wire is carried to its next round, so
the sum of what it contributed tracks the sum of its true pseudo-gradients. Parts are cut by hivemind's own
TensorPartContainer, as in a real all-reduce (our span raw, the other members' spans through the codec)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import CompressionInfo

from tapestry_p2p.comm.codec import compression_for, max_relative_error
from tapestry_p2p.comm.error_feedback import ErrorFeedback, Recording

SHAPES = [torch.Size([300, 70]), torch.Size([1000]), torch.Size([5, 5])]
PART_BYTES = 1024  # several parts per tensor and per span


def send(feedback: ErrorFeedback, codec: str, delta: list[torch.Tensor], fractions: tuple[float, ...]) -> list:
    """One round as the averager runs it for member 0 of a group: returns what member 0 contributed, value by value
    (its own span raw, the others' spans as decoded from the wire)."""
    buffers = [d.clone() for d in delta]
    feedback.add_into(buffers)
    compression = compression_for(codec)
    container = TensorPartContainer(
        buffers, fractions, compression=Recording(compression, feedback.pending), part_size_bytes=PART_BYTES
    )
    contributed = [torch.empty(0)] + [None] * (len(fractions) - 1)
    contributed[0] = torch.cat(container.get_raw_input_parts(0))

    async def encode_span(peer: int) -> torch.Tensor:
        parts = [compression.extract(wire).reshape(-1) async for wire in container.iterate_input_parts_for(peer)]
        return torch.cat(parts)

    for peer in range(1, len(fractions)):
        contributed[peer] = asyncio.run(encode_span(peer))
    feedback.sent(delta)
    flat = torch.cat(contributed)
    return list(flat.split([s.numel() for s in SHAPES]))


@pytest.mark.parametrize("codec", ["4bit", "8bit"])
def test_contributions_track_the_true_updates_over_many_rounds(codec):
    generator = torch.Generator().manual_seed(0)
    with_feedback = ErrorFeedback(SHAPES)
    true_sum = [torch.zeros(s.numel()) for s in SHAPES]
    sent_sum = [torch.zeros(s.numel()) for s in SHAPES]
    drift_without = [torch.zeros(s.numel()) for s in SHAPES]
    codec_of = compression_for(codec)
    for _ in range(60):
        delta = [torch.randn(s, generator=generator) * 0.01 for s in SHAPES]
        sent = send(with_feedback, codec, delta, (0.3, 0.3, 0.4))
        for k, d in enumerate(delta):
            true_sum[k] += d.reshape(-1)
            sent_sum[k] += sent[k]
            # without feedback each round's loss stays lost: it adds up
            alone = d.reshape(-1)
            drift_without[k] += alone - codec_of.extract(codec_of.compress(alone, CompressionInfo.from_tensor(alone)))
    for k in range(len(SHAPES)):
        drift = (sent_sum[k] - true_sum[k]).abs().max()
        # the drift is exactly what is still owed, and that is one round's quantization error, not sixty
        assert torch.allclose(sent_sum[k] + with_feedback.residual[k].reshape(-1), true_sum[k], atol=1e-5)
        assert drift <= max_relative_error(codec) * 0.05 + 1e-6  # |u| < 5 sigma of 0.01 in a block
        assert drift < drift_without[k].abs().max() / 3
    # member 0's own span travels raw: it owes nothing there
    assert torch.equal(with_feedback.residual[0].reshape(-1)[:100], torch.zeros(100))


def test_a_round_alone_and_a_lost_span_carry_the_whole_contribution():
    feedback = ErrorFeedback(SHAPES)
    delta = [torch.full(s, 0.5) + torch.rand(s) for s in SHAPES]
    send(feedback, "4bit", delta, (0.5, 0.5))
    owed = [r.clone() for r in feedback.residual]
    assert any(r.abs().max() > 0 for r in owed)
    alone = feedback.contribution(delta)  # a round without a group applies all of it
    feedback.reset()
    for a, d, r in zip(alone, delta, owed, strict=True):
        assert torch.equal(a, d + r)
    assert all(torch.equal(r, torch.zeros_like(r)) for r in feedback.residual)

    send(feedback, "4bit", delta, (0.5, 0.5))
    owed = [r.clone() for r in feedback.residual]
    feedback.add_into([d.clone() for d in delta])
    feedback.sent(delta, lost_spans=[(21_000, 21_500)])  # values 0..499 of the second tensor lost their reducer
    assert torch.equal(feedback.residual[1][:500], delta[1][:500] + owed[1][:500])
    assert torch.equal(feedback.residual[1][500:], torch.zeros(500))  # pending was cleared and nothing was sent


def test_a_residual_of_other_shapes_is_refused():
    feedback = ErrorFeedback(SHAPES)
    with pytest.raises(ValueError, match="other shapes"):
        feedback.load_state_dict({"residual": [torch.zeros(3)]})
