"""The inner loop: AdamW steps of one partner's working model on its own data. Knows nothing about the network.

The working model lives on the partner's device (`--device`; bf16 autocast on a CUDA card that supports it) while the
shared model stays in float32 on the CPU. `grad_accum` splits each batch into that many micro-batches, so a partner
with little memory still takes the run's batch size per step."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from tapestry_p2p.errors import UserError
from tapestry_p2p.training.data import TokenStream

CPU = torch.device("cpu")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:[0-9]+)$")


class DeviceError(UserError):
    """A --device this machine does not have."""


def resolve_device(name: str, local_rank: Optional[int] = None) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU; asking for CUDA without one is an error.
    Under torchrun (`local_rank` given) `cuda` and `auto` mean this rank's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: torch {torch.__version__} sees no CUDA device here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


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

    def __init__(
        self,
        model: torch.nn.Module,
        batches: TokenStream,
        config: TrainConfig,
        device: torch.device = CPU,
        grad_accum: int = 1,
    ) -> None:
        if config.batch_size % grad_accum:
            raise ValueError(f"--grad-accum {grad_accum} must divide the run's batch size {config.batch_size}")
        self.model, self.batches, self.config = model.to(device), batches, config
        self.device, self.grad_accum = device, grad_accum
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.steps = 0

    def step(self) -> float:
        """One AdamW step on the next batch (in `grad_accum` micro-batches); returns its training loss."""
        self.model.train()
        inputs, targets = self.batches.next()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in zip(inputs.chunk(self.grad_accum), targets.chunk(self.grad_accum), strict=True):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                _, loss = self.model(x.to(self.device), y.to(self.device))
            (loss / self.grad_accum).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # no gradients held between steps (nor during a round's averaging)
        self.steps += 1
        return total / self.grad_accum

    @property
    def _unwrapped(self) -> torch.nn.Module:
        """The model itself, also when DistributedDataParallel wraps it (checkpoints name its tensors the same)."""
        module = getattr(self.model, "module", self.model)
        assert isinstance(module, torch.nn.Module)
        return module

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self._unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data": self.batches.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["data"])
        self.steps = int(state["steps"])


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: tuple[torch.Tensor, torch.Tensor], batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) of `model` on fixed held-out windows."""
    model.eval()
    inputs, targets = windows
    losses = []
    for x, y in zip(inputs.split(batch_size), targets.split(batch_size), strict=True):
        _, loss = model(x, y)
        losses.append(loss.item() * len(x))
    return sum(losses) / len(inputs)
