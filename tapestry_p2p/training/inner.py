"""The inner loop: AdamW steps of one partner's working model on its own data. Knows nothing about the network."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tapestry_p2p.training.data import ByteBatches
from tapestry_p2p.training.model import GPT


@dataclass
class TrainConfig:
    batch_size: int = 16
    lr: float = 3e-3  # inner AdamW learning rate
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"train.batch_size must be a positive integer, got {self.batch_size}")
        for name in ("lr", "grad_clip"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"train.{name} must be a positive number, got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")


class InnerTrainer:
    """Owns the working model, its AdamW state and the data stream. Inner optimizer state never leaves the peer."""

    def __init__(self, model: GPT, batches: ByteBatches, config: TrainConfig) -> None:
        self.model, self.batches, self.config = model, batches, config
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.steps = 0

    def step(self) -> float:
        """One AdamW step on the next batch; returns its training loss."""
        self.model.train()
        inputs, targets = self.batches.next()
        _, loss = self.model(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.steps += 1
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data": self.batches.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["data"])
        self.steps = int(state["steps"])


@torch.no_grad()
def evaluate(model: GPT, windows: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean next-byte cross-entropy (nats) of `model` on fixed held-out windows."""
    model.eval()
    inputs, targets = windows
    _, loss = model(inputs, targets)
    return loss.item()
