"""Error feedback: what a lossy codec dropped from a partner's pseudo-gradient is added to its next one.

With a lossy codec (8bit, 4bit, fp16) a partner that contributes `u = delta + e` to a round puts `Q(u)` on the wire for
the spans other members reduce (its own span is averaged unquantized). The residual it carries to the next round is
`e' = u - decoded Q(u)` on those spans, zero on its own span. So over many rounds the sum of what a partner actually
contributed tracks the sum of its true pseudo-gradients within one round's quantization error, instead of drifting by
the sum of every round's error (tests/unit/test_error_feedback.py asserts the bound).

Special cases:
- a round without a group applies `u` whole, locally: the residual becomes zero;
- a span whose reducer died got no update this round on any member: the whole of `u` on that span is carried over;
- a partner that adopts another peer's state (a re-sync, a catch-up) starts from zero: the residual belonged to the
  model it left;
- a non-finite `u` is never sent (see `averaging`) and resets the residual.

The residual is written by the averager process while the all-reduce encodes our parts (`record`), into a buffer in
shared memory; `SwarmAveraging` settles it after the round. It is part of the checkpoint (`state_dict`), so a partner
that resumes owes the swarm exactly what it owed when it stopped. Cost: two model-sized float32 buffers.

The averaged result each reducer publishes is quantized once more; that error is the same on every member (the shared
model stays bit-identical) and is not fed back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.proto import runtime_pb2


class ErrorFeedback:
    """One partner's residual: what its past contributions lost on the wire and still owes the swarm."""

    def __init__(self, shapes: Sequence[torch.Size]) -> None:
        self.residual = [torch.zeros(shape) for shape in shapes]
        # what the parts of the round under way lost: written by the averager process, hence shared memory
        self.pending = [torch.zeros(shape).share_memory_() for shape in shapes]

    @torch.no_grad()
    def add_into(self, buffers: Sequence[torch.Tensor]) -> None:
        """buffers += residual (the round's contribution `u`), and clear the record of what this round loses."""
        for buffer, residual, pending in zip(buffers, self.residual, self.pending, strict=True):
            buffer.add_(residual)
            pending.zero_()

    @torch.no_grad()
    def contribution(self, delta: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """delta + residual, as new tensors (what a round that goes alone applies)."""
        return [d + r for d, r in zip(delta, self.residual, strict=True)]

    @torch.no_grad()
    def sent(self, delta: Sequence[torch.Tensor], lost_spans: Sequence[tuple[int, int]] = ()) -> None:
        """The round's all-reduce completed: carry what the codec dropped, and the whole contribution on the
        [start, end) spans (flat, over all tensors) whose reducer died."""
        for index, lo, hi in flat_ranges([r.numel() for r in self.residual], lost_spans):
            flat = self.pending[index].view(-1)
            flat[lo:hi] = delta[index].reshape(-1)[lo:hi] + self.residual[index].view(-1)[lo:hi]
        for residual, pending in zip(self.residual, self.pending, strict=True):
            residual.copy_(pending)

    @torch.no_grad()
    def reset(self) -> None:
        """Owe nothing (a round applied alone, a state adopted from another peer, a non-finite update)."""
        for residual in self.residual:
            residual.zero_()

    def norm(self) -> float:
        return float(sum(float(torch.linalg.vector_norm(r)) ** 2 for r in self.residual) ** 0.5)

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"residual": [r.clone() for r in self.residual]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        loaded = state["residual"]
        shapes = [tuple(getattr(t, "shape", ())) for t in loaded] if isinstance(loaded, list) else None
        if shapes != [tuple(r.shape) for r in self.residual]:
            raise ValueError("the error-feedback residual has other shapes than the model")
        for residual, value in zip(self.residual, loaded, strict=True):
            residual.copy_(value)


class Recording(CompressionBase):
    """Wraps the round's codec on the sending side: encodes a part as the codec does and writes what it lost into
    `sink` (the tensors of the all-reduce, in the same layout), at the part's place.

    hivemind splits tensor `info.key` into parts of `info.part_size` values and names each by `info.part_index`
    (`TensorPartContainer`), which locates the part inside its tensor."""

    def __init__(self, codec: CompressionBase, sink: Sequence[torch.Tensor]) -> None:
        self.codec, self.sink = codec, sink
        self.compression_type = codec.compression_type

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        wire = self.codec.compress(tensor, info, allow_inplace=False)
        start = info.part_index * (info.part_size or 0)
        target = self.sink[int(info.key)].view(-1)[start : start + tensor.numel()]
        torch.sub(tensor.detach().reshape(-1), self.codec.extract(wire).reshape(-1), out=target)
        return wire

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        return self.codec.extract(serialized_tensor)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.codec.estimate_compression_ratio(info)


def flat_ranges(sizes: Sequence[int], spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """(tensor index, lo, hi) for the parts of each [start, end) span of the tensors' concatenated flat view."""
    offset = 0
    for index, size in enumerate(sizes):
        for start, end in spans:
            lo, hi = max(start - offset, 0), min(end - offset, size)
            if lo < hi:
                yield index, lo, hi
        offset += size
