"""A partner node's configuration: one typed dataclass per component, each validating itself.

`NodeConfig` holds what the node decides (run, data, addresses, files, rounds) and one section per component:
`model` (training.model.ModelConfig, or training.hf.HFModelConfig), `train` (training.inner.TrainConfig), `outer`
(training.outer.OuterConfig) and `schedule` (comm.matchmaking.RoundSchedule). These dataclasses are the one source
of every default: the CLI's flags and a partner's TOML file (`[model]`, `[train]`, `[outer]`, `[schedule]` sections)
take theirs from here. The fields a whole run shares (`spec()`) may instead come from a run spec file (`node.spec`).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tapestry_p2p.comm.codec import CODECS, Codec
from tapestry_p2p.comm.matchmaking import RoundSchedule
from tapestry_p2p.comm.screening import DEFAULT_CLIP_MULTIPLE
from tapestry_p2p.p2p.addresses import DEFAULT_PEER_LISTEN
from tapestry_p2p.training.inner import DEVICE_PATTERN, TrainConfig
from tapestry_p2p.training.model import AnyModelConfig, ModelConfig
from tapestry_p2p.training.outer import OuterConfig

DEFAULT_RUN_ID = "tapestry"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RUN_ID_RULE = "must be 1-64 letters, digits, '-' or '_'"


def check_run_id(run_id: str) -> None:
    if not RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"run id {run_id!r} {RUN_ID_RULE}")


def run_seed(run_id: str) -> int:
    """The model-initialization seed every peer of a run agrees on without talking."""
    return zlib.crc32(run_id.encode())


@dataclass
class NodeConfig:
    data: Path
    run_id: str = DEFAULT_RUN_ID
    initial_peers: list[str] = field(default_factory=list)
    listen: list[str] = field(default_factory=lambda: list(DEFAULT_PEER_LISTEN))
    announce: list[str] = field(default_factory=list)
    identity: Optional[Path] = None
    consortium: Optional[Path] = None  # the consortium file (members only); None: an open swarm
    checkpoint_dir: Optional[Path] = None
    keep_checkpoints: int = 3  # rounds kept in <checkpoint_dir>/history for a roll-back (0: none)
    checkpoint_rounds: int = 1  # checkpoint after every N-th round (0: not by rounds)...
    checkpoint_minutes: float = 0.0  # ... or once this many minutes passed since the last one (0: not by time)
    metrics: Optional[Path] = None
    partner: str = "partner"
    region: str = "unknown"
    inner_steps: int = 50  # H: inner steps before a peer calls the round's meeting
    max_rounds: Optional[int] = None  # stop after this many outer rounds; None: until interrupted
    min_peers: int = 1  # trainers (us included) that must be online before our first round
    compression: Codec = "8bit"
    clip_multiple: float = DEFAULT_CLIP_MULTIPLE  # a sender's update is clipped to this x the group's median norm
    threads: int = 0  # torch threads; 0 keeps torch's default
    solo: bool = False  # no network at all: the trained-alone baseline
    start_fresh: bool = False  # if the swarm is ahead and nobody serves its state: train from our own, don't wait
    # average round r in the background while training round r+1, its update applied one round late (node.overlap)
    overlap: bool = True
    run_spec: Optional[Path] = None  # the run spec the shared fields came from (None: from flags, the quick-start)
    seed: Optional[int] = None  # seeds the initial model (None: derived from the run id)
    initial_model: str = ""  # the initial model's hash every partner must start from ("": not pinned)
    text_field: str = "text"  # the text column of .jsonl/.parquet files and datasets
    device: str = "cpu"  # where the inner steps run: auto, cpu, cuda, cuda:N
    grad_accum: int = 1  # micro-batches per inner step (a partner's own choice; the batch size is the run's)
    model: AnyModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    schedule: RoundSchedule = field(default_factory=RoundSchedule)

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        if self.inner_steps <= 0:
            raise ValueError(f"inner steps must be a positive integer, got {self.inner_steps}")
        if self.max_rounds is not None and self.max_rounds <= 0:
            raise ValueError(f"max rounds must be a positive integer, got {self.max_rounds}")
        if self.compression not in CODECS:
            raise ValueError(f"compression must be one of {', '.join(CODECS)}, got {self.compression!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.checkpoint_rounds < 0 or self.checkpoint_minutes < 0:
            raise ValueError("checkpoint every: give a number of rounds (5) or of minutes (10m)")
        if self.checkpoint_rounds == 0 and self.checkpoint_minutes == 0:
            self.checkpoint_rounds = 1
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep checkpoints must be >= 0, got {self.keep_checkpoints}")
        if not self.clip_multiple >= 1.0:
            raise ValueError(f"clip multiple must be at least 1, got {self.clip_multiple}")
        if self.consortium is not None and self.identity is None:
            raise ValueError("a member node needs its persistent identity: pass --identity with --consortium")
        if self.min_peers <= 0:
            raise ValueError(f"min peers must be a positive integer, got {self.min_peers}")
        if not DEVICE_PATTERN.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.grad_accum <= 0 or self.train.batch_size % self.grad_accum:
            raise ValueError(
                f"grad accum {self.grad_accum} must divide the run's batch size {self.train.batch_size}; "
                "pick a divisor of it"
            )

    @property
    def model_seed(self) -> int:
        return run_seed(self.run_id) if self.seed is None else self.seed

    def spec(self) -> dict[str, Any]:
        """What every partner of the run must share (see node.spec)."""
        return dict(
            run_id=self.run_id,
            inner_steps=self.inner_steps,
            compression=self.compression,
            seed=self.model_seed,
            initial_model=self.initial_model,
            model=self.model,
            train=self.train,
            outer=self.outer,
        )
