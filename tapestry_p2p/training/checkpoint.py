"""Checkpoints: what a peer writes after every outer round so it can stop and resume at any time.

A checkpoint directory holds
- `model.safetensors`: the shared model after the last completed outer round (float32, `state_dict` names);
- `state.pt`: everything else resuming needs (working model, inner and outer optimizer states, data position, RNG,
  round and step, the inner losses of a round stopped half-way, the error-feedback residual of a lossy codec), the
  model config (so a checkpoint says what it holds, as nanoGPT's `model_args` do), plus the hash of the shared model
  it belongs with.
Each file is written to a temporary file in the same directory, fsynced, then renamed over the old one, so a crash
leaves either the old or the new file, never half of one. `model.safetensors` is renamed first; `state.pt` records
its hash, so a crash between the two renames is detected on resume instead of silently mixing rounds.

Before a save replaces them, the current pair is hard-linked into `previous/` (no copy, and atomic per file), so a
checkpoint damaged on disk after it was written (a truncated copy, a full disk, a bad restore) still leaves the one
before it to resume from. The last K saved rounds are also kept, hard-linked, in `history/round-NNNNNN/`
(`--keep-checkpoints`), so a round that went wrong for everyone (a bad update the clipping let through) can be rolled
back: resume with `--checkpoint-dir <dir>/history/round-NNNNNN`, or copy its two files back.

A checkpoint records the run it belongs to (`RunIdentity`: run id, consortium id, the hash of the initial model it
descends from); resuming it into another run is refused with one line (an operator who points --checkpoint-dir at
another run's folder would otherwise push that run's model into this swarm).

A checkpoint that cannot be read is refused with the file's name and both ways out; the node never starts from scratch
on its own and never writes over a checkpoint it could not read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from safetensors.torch import load_file, save_file

from tapestry_p2p import __version__
from tapestry_p2p.errors import UserError
from tapestry_p2p.files import atomic_write
from tapestry_p2p.training.inner import InnerTrainer
from tapestry_p2p.training.model import (
    AnyModelConfig,
    build_model,
    describe,
    load_weights,
    model_config_from_dict,
    weights,
)
from tapestry_p2p.training.outer import SharedModel

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
PREVIOUS = "previous"
HISTORY = "history"


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """Which run a checkpoint belongs to."""

    run_id: str
    consortium: str  # the consortium's id (its version 1 digest), "" for an open swarm
    initial_model: str  # hash of the model every partner of the run starts from

    def differs_from(self, other: RunIdentity) -> str:
        """A short description of the first difference ("" if none)."""
        if self.run_id != other.run_id:
            return f"run {other.run_id!r}, not {self.run_id!r}"
        if self.consortium != other.consortium:
            return f"consortium {other.consortium[:12] or '(open swarm)'}, not {self.consortium[:12] or '(open swarm)'}"
        if self.initial_model != other.initial_model:
            return f"a run started from initial model {other.initial_model[:12]}, not {self.initial_model[:12]}"
        return ""


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and the way out."""


def save(
    directory: Path, shared: dict[str, torch.Tensor], state: dict[str, Any], round_no: int = 0, keep: int = 0
) -> None:
    """Write a checkpoint; with `keep` > 0, also keep it as round `round_no` in `history/` (the last `keep` rounds)."""
    directory.mkdir(parents=True, exist_ok=True)
    _keep_previous(directory)
    tensors = {name: t.detach().to(torch.float32).contiguous() for name, t in shared.items()}
    atomic_write(directory / MODEL_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write(directory / STATE_FILE, lambda tmp: torch.save(state, tmp))
    if keep > 0:
        _link_pair(directory, directory / HISTORY / f"round-{round_no:06d}")
        for old in sorted((directory / HISTORY).glob("round-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _link_pair(directory: Path, target: Path) -> None:
    """Hard-link the checkpoint's two files into `target` (each under a temporary name, then renamed)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, STATE_FILE):
        tmp = target / f".{name}.link"
        tmp.unlink(missing_ok=True)
        os.link(directory / name, tmp)
        os.replace(tmp, target / name)


def _keep_previous(directory: Path) -> None:
    """Hard-link the current checkpoint files into `previous/` (each link made under a temporary name, then renamed)."""
    if not ((directory / MODEL_FILE).exists() and (directory / STATE_FILE).exists()):
        return
    _link_pair(directory, directory / PREVIOUS)


def way_out(directory: Path) -> str:
    previous = directory / PREVIOUS
    if (previous / MODEL_FILE).exists() and (previous / STATE_FILE).exists():
        return f"to resume from the round before, run: cp {previous}/* {directory}/ ; or pass a new --checkpoint-dir"
    return "restore it from a backup, or pass a new --checkpoint-dir to start fresh"


def exists(directory: Path) -> bool:
    return (directory / MODEL_FILE).exists() or (directory / STATE_FILE).exists()


def load(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint back; raises CheckpointError naming the bad file and the way out."""
    model_path, state_path = directory / MODEL_FILE, directory / STATE_FILE
    for path in (model_path, state_path):
        if not path.exists():
            raise CheckpointError(f"{path} is missing; {way_out(directory)}")
    try:
        shared = load_file(str(model_path))
    except Exception as e:  # noqa: BLE001 (safetensors raises many types; all mean an unusable file, named below)
        raise CheckpointError(f"{model_path} is truncated or corrupt ({_reason(e)}); {way_out(directory)}") from None
    try:
        state = torch.load(str(state_path), weights_only=True)
    except Exception as e:  # noqa: BLE001 (unpickling raises many types; all mean an unusable file, named below)
        raise CheckpointError(f"{state_path} is truncated or corrupt ({_reason(e)}); {way_out(directory)}") from None
    return shared, state


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:80]}" if text else type(error).__name__


def load_model(directory: Path) -> tuple[torch.nn.Module, AnyModelConfig]:
    """The shared model of a checkpoint, built from the model config the checkpoint records (evaluation, export)."""
    shared, state = load(directory)
    try:
        config = model_config_from_dict(state["model_config"])
        model = build_model(config, seed=0)
        load_weights(model, shared)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{directory / STATE_FILE} does not describe {MODEL_FILE} ({e}); {way_out(directory)}"
        ) from None
    return model, config


class Residual(Protocol):
    """State a node keeps outside the model and optimizers that resuming must restore: the error-feedback residual
    (comm.error_feedback.ErrorFeedback; training does not import the network layer)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def reset(self) -> None: ...


class CheckpointManager:
    """Saves and restores one node's training state (shared model, outer and inner optimizers, data, RNG) in a
    checkpoint directory; `lock` guards theta against the thread that serves it to peers."""

    def __init__(
        self,
        directory: Path,
        shared: SharedModel,
        trainer: InnerTrainer,
        model: AnyModelConfig,
        lock: threading.Lock,
        run: RunIdentity,
        keep: int = 0,
        feedback: Optional[Residual] = None,
    ) -> None:
        self.directory, self.shared, self.trainer, self.model, self.lock = directory, shared, trainer, model, lock
        self.run, self.keep, self.feedback = run, keep, feedback

    def exists(self) -> bool:
        return exists(self.directory)

    def save(self, round_losses: Sequence[float]) -> None:
        """Checkpoint everything resuming needs (after each round, after a catch-up, and when stopping mid-round)."""
        with self.lock:
            state = {
                "outer": self.shared.state_dict(),
                "inner": self.trainer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "round_losses": list(round_losses),
                "model_config": describe(self.model),
                "model_hash": self.shared.hash(),
                "version": __version__,
                "run": dataclasses.asdict(self.run),
                # what our lossy-coded contributions still owe the swarm (absent without a lossy codec)
                "error_feedback": None if self.feedback is None else self.feedback.state_dict(),
            }
            round_no = self.shared.round
        save(self.directory, weights(self.shared.model), state, round_no, self.keep)

    def resume(self) -> list[float]:
        """Restore the checkpoint; returns the inner losses of the round it stopped in (empty between rounds)."""
        shared, state = load(self.directory)
        self._check_model(state, shared)  # first: a model of another shape has its own, more useful, message
        self._check_run(state)
        try:
            self.shared.load_weights(shared)
            self.shared.load_state_dict(state["outer"])
            self.trainer.load_state_dict(state["inner"])
            torch.set_rng_state(state["torch_rng"])
            self._resume_feedback(state.get("error_feedback"))
            round_losses = [float(x) for x in state["round_losses"]]
            model_hash = state["model_hash"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{self.directory / STATE_FILE} does not fit this model or version ({type(e).__name__}); "
                f"{way_out(self.directory)}"
            ) from None
        if self.shared.hash() != model_hash:
            raise CheckpointError(
                f"{self.directory / STATE_FILE} belongs to another {MODEL_FILE} (interrupted write?); "
                f"{way_out(self.directory)}"
            )
        logger.info(
            "resumed from %s at round %d, step %d (%d steps into the next round)",
            self.directory,
            self.shared.round,
            self.trainer.steps,
            len(round_losses),
        )
        return round_losses

    def _resume_feedback(self, saved: Optional[dict[str, Any]]) -> None:
        """Restore the error-feedback residual; a checkpoint of another codec (or an older one) starts owing nothing."""
        if self.feedback is None:
            return
        if saved is None:
            logger.info("%s holds no error-feedback residual: starting from zero", self.directory)
            self.feedback.reset()
            return
        self.feedback.load_state_dict(saved)

    def _check_run(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another run (a checkpoint written before checkpoints recorded their run passes)."""
        found = state.get("run")
        if found is None:
            logger.warning("%s does not record its run (an older version wrote it): resuming it as is", self.directory)
            return
        try:
            recorded = RunIdentity(**found)
        except TypeError:
            raise CheckpointError(
                f"{self.directory / STATE_FILE} records its run in another version's format; {way_out(self.directory)}"
            ) from None
        difference = self.run.differs_from(recorded)
        if difference:
            raise CheckpointError(
                f"--checkpoint-dir {self.directory} belongs to {difference}: point --checkpoint-dir at this run's "
                f"folder, or at a new one to join with a fresh state"
            )

    def _check_model(self, state: dict[str, Any], shared: dict[str, torch.Tensor]) -> None:
        """Refuse a checkpoint of another model, naming the first option that differs (or, for a checkpoint written
        before checkpoints recorded their model config, the first tensor whose shape differs)."""
        found = state.get("model_config")
        expected = describe(self.model)
        if found is None:
            self._check_shapes(shared)
            return
        if not isinstance(found, dict) or found.keys() != expected.keys():
            raise CheckpointError(
                f"{self.directory / STATE_FILE} records a model config of another version; {way_out(self.directory)}"
            )
        differs = [name for name in expected if found[name] != expected[name]]
        if differs:
            name = differs[0]
            raise CheckpointError(
                f"{self.directory / MODEL_FILE} holds a model of another shape ({name}: {found[name]} there, "
                f"{expected[name]} with these options); pass the model options it was trained with "
                f"([model] {name} = {found[name]}), or a new --checkpoint-dir"
            )

    def _check_shapes(self, shared: dict[str, torch.Tensor]) -> None:
        expected = {k: tuple(v.shape) for k, v in weights(self.shared.model).items()}
        found = {k: tuple(v.shape) for k, v in shared.items()}
        if found != expected:
            name = sorted(k for k in expected.keys() | found.keys() if found.get(k) != expected.get(k))[0]
            raise CheckpointError(
                f"{self.directory / MODEL_FILE} holds a model of another shape ({name}: {found.get(name)} there, "
                f"{expected.get(name)} with these options); pass the model options it was trained with, "
                f"or a new --checkpoint-dir"
            )
