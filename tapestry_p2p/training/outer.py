"""DiLoCo's outer step: the shared model `theta`, its pseudo-gradient, and Nesterov-momentum SGD on it.

`theta` stays in float32 on the CPU (as DiLoCo implementations keep it, sparing accelerator memory).

After H inner steps a peer's pseudo-gradient is `theta - working`. The swarm averages it (see `allreduce`), then every
member runs the same `OuterOptimizer.step` on the same inputs, so `theta` stays identical, bit for bit, across the
group. DiLoCo's settings (lr 0.7, momentum 0.9, Nesterov) are the defaults. With overlapped rounds the average
arrives one round late and the working model keeps its newer progress (`apply_keeping_progress`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from tapestry_p2p.training.model import load_weights, weights


@dataclass
class OuterConfig:
    lr: float = 0.7
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"outer.lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"outer.momentum must be in [0, 1), got {self.momentum}")


class SharedModel:
    """`theta` (the model as of the last outer round), the outer optimizer, and the round counter."""

    def __init__(self, model: torch.nn.Module, config: OuterConfig) -> None:
        self.model = model
        self.params: list[torch.nn.Parameter] = list(model.parameters())
        # (torch refuses Nesterov without momentum: momentum 0 is plain SGD)
        nesterov = config.momentum > 0
        self.optimizer = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum, nesterov=nesterov)
        self.round = 0
        self._hash: Optional[str] = None  # theta changes only through the methods below, which clear it

    @torch.no_grad()
    def pseudo_gradient(self, working: torch.nn.Module) -> list[torch.Tensor]:
        """theta - working, one tensor per parameter (float32, on the CPU: the working model may be on a GPU)."""
        return [theta - w.to("cpu", torch.float32) for theta, w in zip(self.params, working.parameters(), strict=True)]

    @torch.no_grad()
    def apply(self, averaged: Sequence[torch.Tensor]) -> None:
        """One outer Nesterov step with the group's averaged pseudo-gradient; advances the round."""
        for param, grad in zip(self.params, averaged, strict=True):
            param.grad = grad  # the caller's tensors, used once: no copy (at 1B parameters a copy is 4 GB)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.round += 1
        self._hash = None

    @torch.no_grad()
    def apply_keeping_progress(
        self, averaged: Sequence[torch.Tensor], working: torch.nn.Module, in_flight: Sequence[torch.Tensor]
    ) -> None:
        """The overlapped rounds' outer step (`--overlap`, see node.overlap): apply the average of the round that was
        in flight, and move the working model with theta, keeping the progress it made since that round was
        launched: `progress = theta - working - in_flight`, then `working = theta' - progress`."""
        progress = [d - sent for d, sent in zip(self.pseudo_gradient(working), in_flight, strict=True)]
        self.apply(averaged)
        self.move_working(working, progress)

    @torch.no_grad()
    def move_working(self, working: torch.nn.Module, progress: Sequence[torch.Tensor]) -> None:
        """Put the working copy at `theta - progress` (theta changed under it; its own progress stays)."""
        for w, theta, p in zip(working.parameters(), self.params, progress, strict=True):
            w.copy_(theta - p)

    @torch.no_grad()
    def copy_into(self, working: torch.nn.Module) -> None:
        """Restart the working copy from theta (inner optimizer state stays as it is)."""
        for w, theta in zip(working.parameters(), self.params, strict=True):
            w.copy_(theta)

    def momentum_buffers(self) -> list[torch.Tensor]:
        """The outer optimizer's momentum, one tensor per parameter (zeros before the first step)."""
        return [self.optimizer.state.get(p, {}).get("momentum_buffer", torch.zeros_like(p)) for p in self.params]

    @torch.no_grad()
    def load(self, params: Sequence[torch.Tensor], momentum: Sequence[torch.Tensor], round_no: int) -> None:
        """Adopt another peer's theta, outer momentum and round (a re-sync or a late join)."""
        for p, value, buf in zip(self.params, params, momentum, strict=True):
            p.copy_(value)
            self.optimizer.state[p]["momentum_buffer"] = buf.clone()
        self.round = round_no
        self._hash = None

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set theta from named tensors (a checkpoint; see model.load_weights)."""
        load_weights(self.model, tensors)
        self._hash = None

    def hash(self) -> str:
        """16 hex digits identifying theta's exact bytes; equal on every peer whose shared model is identical.
        Computed once per change of theta (hashing a billion parameters takes seconds)."""
        if self._hash is None:
            digest = hashlib.sha256()
            for name, tensor in weights(self.model).items():
                digest.update(name.encode())
                digest.update(tensor.detach().contiguous().numpy().data)
            self._hash = digest.hexdigest()[:16]
        return self._hash

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.round = int(state["round"])
