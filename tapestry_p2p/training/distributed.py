"""A partner bigger than one process: `torchrun --nproc-per-node N -m tapestry_p2p join ...`.

Inside one partner the ranks train as ordinary data parallelism (torch.distributed: gloo on the CPU, NCCL on GPUs;
the working model wrapped in DistributedDataParallel, each rank on its own share of the partner's batches). Only
rank 0 is a swarm node: it alone holds the shared model, averages with the other partners and checkpoints, so the peer
table shows one partner. Rank 0 leads the others step by step with one small broadcast per inner step:

- `TRAIN`: every rank takes one inner step (DDP averages the gradients inside the backward pass);
- `SYNC`: rank 0's working model was reset from the shared model (an outer round, a re-sync, a resume): its
  parameters follow, broadcast to every rank;
- `STOP`: the run is over; each rank logs the hash of the model it ends with.

Everything here is local to the partner's machine (or its cluster): nothing of it goes to the swarm.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

logger = logging.getLogger(__name__)

TRAIN, SYNC, STOP = 0, 1, 2


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def launched_ranks() -> Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 when started without torchrun)."""
    return Ranks(
        rank=int(os.environ.get("RANK", "0")),
        world=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


class PartnerGroup:
    """The ranks of one partner; rank 0 leads (see the module docstring)."""

    def __init__(self, ranks: Ranks, device: torch.device) -> None:
        self.ranks, self.device = ranks, device
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        self._command = torch.zeros(1, dtype=torch.long, device=device)
        self._dirty = True  # the first step starts with every rank on rank 0's working model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The working model, its gradients averaged across the partner's ranks."""
        device_ids = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def working_model_reset(self) -> None:
        """Rank 0's working model was reset from the shared model: send it before the next step."""
        self._dirty = True

    def lead_step(self, model: nn.Module) -> None:
        """Rank 0, before each inner step: tell the others to take it (after syncing the model if it was reset)."""
        if self._dirty:
            self._send(SYNC)
            self._broadcast_parameters(model)
            self._dirty = False
        self._send(TRAIN)

    def follow(self, model: nn.Module, step: object) -> None:
        """Ranks > 0: take the steps rank 0 commands until it says STOP; `step()` is one inner step."""
        while True:
            dist.broadcast(self._command, src=0)
            command = int(self._command.item())
            if command == STOP:
                break
            if command == SYNC:
                self._broadcast_parameters(model)
            else:
                step()  # type: ignore[operator]
        logger.info(
            "rank %d of %d ends with shared model %s", self.ranks.rank, self.ranks.world, parameters_hash(model)
        )

    def stop(self, model: nn.Module) -> None:
        """Rank 0, at the end of the run: bring every rank to the final shared model, then release them."""
        self._send(SYNC)
        self._broadcast_parameters(model)
        self._send(STOP)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _send(self, command: int) -> None:
        self._command.fill_(command)
        dist.broadcast(self._command, src=0)

    @torch.no_grad()
    def _broadcast_parameters(self, model: nn.Module) -> None:
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def parameters_hash(model: nn.Module) -> str:
    """16 hex digits of the model's parameters, in the shared model's order and format (float32, CPU)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.removeprefix("module.").encode())
        digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
