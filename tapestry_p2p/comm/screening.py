"""What a reducer accepts from each sender of a round, and how far each sender can move the average.

Every member of a group is a reducer for its span of the flattened tensors, and sees each sender's copy of that span.
Before the all-reduce, each sender declares its inner steps and the L2 norm of its whole pseudo-gradient, signed by
itself (`agreement.Declaration`: nobody relays anybody's metadata). Each reducer then, for every sender:

- accepts a part only with the exact expected number of values, float32 after decoding, the round's codec, finite
  values, and a weight equal to the weight the sender's declared steps give (`weight_for`, at most H);
- checks that the norm of what the sender sent for this span never exceeds its declared norm (the span is a piece
  of the whole, so an honest sender is always within it, plus the codec's error);
- scales the sender's parts by `min(1, tau / declared_norm)`, where `tau = clip_multiple x the lower median of the
  declared norms of the group`: a sender that declares a larger norm than the others is clipped to `tau`, and a sender
  that declares less than it sends is refused. Lying only shrinks the liar's own contribution.

A refused sender's remaining parts are not used (hivemind bans it from the reducer for the round), and the reducer
reports the refusal; clips are reported too. The lower median needs a majority of honest senders to be robust (with
two senders it is the smaller norm). Centered clipping, medians and trimmed means are not used: with partners whose
data differ on purpose, they treat an honest minority language as an outlier (`docs/THREAT-MODEL.md`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

DEFAULT_CLIP_MULTIPLE = 3.0  # tau = this x the lower median of the group's declared norms (docs/THREAT-MODEL.md)
# What a span may exceed its sender's declared norm by: a codec's error adds to the norm (errors of 1.2% for 8-bit and
# 12% for 4-bit, nearly orthogonal to the values, add +0.01% and +0.7% on Gaussian data), with margin.
NORM_TOLERANCE = 1.1
ZERO_STEP_WEIGHT = 1e-6  # a member with no inner steps still takes part, at this negligible weight
MAX_NORM = 1e30  # a declared norm above this is malformed


def weight_for(steps: int, max_steps: int) -> float:
    """A sender's all-reduce weight: its inner steps this round, at most H, never zero."""
    return float(max(min(steps, max_steps), ZERO_STEP_WEIGHT))


def clip_threshold(norms: Sequence[float], clip_multiple: float) -> float:
    """tau: `clip_multiple` x the lower median of the declared norms (inf if there are none)."""
    return clip_multiple * statistics.median_low(norms) if norms else math.inf


@dataclass
class Screen:
    """One reducer's checks of one round: `declared_steps` and `declared_norms` are per sender, in sender order;
    `part_sizes` are the numbers of values of this reducer's parts, in order.

    `tau` uses the group's declared norms; a sender that declared a larger norm than it sends is clipped more (its own
    loss), one that declared a smaller norm is refused once its span exceeds it."""

    declared_steps: Sequence[int]
    declared_norms: Sequence[float]
    codec: int  # hivemind's CompressionType enum value every part must carry
    max_steps: int  # H
    clip_multiple: float = DEFAULT_CLIP_MULTIPLE
    part_sizes: Sequence[int] = ()  # filled in by the reducer (`allreduce.ExactAllReduceRunner`)
    _sums: dict[int, float] = field(default_factory=dict)  # sender -> sum of squares received so far (decoded)

    def __post_init__(self) -> None:
        self.tau = clip_threshold(self.declared_norms, self.clip_multiple)

    def scale(self, sender: int) -> float:
        """The factor this sender's parts are multiplied by (1: not clipped)."""
        norm = self.declared_norms[sender]
        return 1.0 if norm <= self.tau else self.tau / norm

    def check(self, sender: int, part_index: int, part: torch.Tensor, weight: float, codec: int) -> Optional[str]:
        """Why this part is refused, or None if it is accepted (then it counts towards the sender's span norm)."""
        if part_index >= len(self.part_sizes):
            return f"sent part #{part_index}, this span has {len(self.part_sizes)}"
        if codec != self.codec:
            return f"sent a part with codec #{codec}, the round's is #{self.codec}"
        if part.dtype != torch.float32 or part.numel() != self.part_sizes[part_index]:
            size = self.part_sizes[part_index]
            return f"sent {part.numel()} values of {part.dtype} for part #{part_index}, expected {size} of float32"
        expected = weight_for(self.declared_steps[sender], self.max_steps)
        if not math.isclose(weight, expected, rel_tol=1e-6):
            return f"sent weight {weight:g}, its declared steps give {expected:g}"
        if not bool(torch.isfinite(part).all()):
            return "sent non-finite values"
        total = self._sums.get(sender, 0.0) + float(part.double().square().sum())
        declared = self.declared_norms[sender]
        if math.sqrt(total) > declared * NORM_TOLERANCE + 1e-12:
            return f"sent more than its declared norm {declared:.3g} (at least {math.sqrt(total):.3g})"
        self._sums[sender] = total
        return None
