"""Checkpoints: what a peer writes after every outer round so it can stop and resume at any time.

A checkpoint directory holds
- `model.safetensors`: the shared model after the last completed outer round (float32, `state_dict` names);
- `state.pt`: everything else resuming needs (working model, inner and outer optimizer states, data position, RNG,
  round and step), plus the hash of the shared model it belongs with.
Each file is written to a temporary file in the same directory, fsynced, then renamed over the old one, so a crash
leaves either the old or the new file, never half of one. `model.safetensors` is renamed first; `state.pt` records
its hash, so a crash between the two renames is detected on resume instead of silently mixing rounds.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import torch
from safetensors.torch import load_file, save_file

from tapestry_p2p import UserError

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and the way out."""


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync, then rename onto `path`; on failure the old file is untouched."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(directory: Path, shared: Dict[str, torch.Tensor], state: Dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(torch.float32).contiguous() for name, t in shared.items()}
    atomic_write(directory / MODEL_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write(directory / STATE_FILE, lambda tmp: torch.save(state, tmp))


def exists(directory: Path) -> bool:
    return (directory / MODEL_FILE).exists() or (directory / STATE_FILE).exists()


def load(directory: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a checkpoint back; raises CheckpointError naming the bad file."""
    model_path, state_path = directory / MODEL_FILE, directory / STATE_FILE
    if not model_path.exists():
        raise CheckpointError(f"{model_path} is missing; restore it or pass a new --checkpoint-dir to start fresh")
    try:
        shared = load_file(str(model_path))
    except Exception as e:
        raise CheckpointError(
            f"{model_path} is unreadable ({type(e).__name__}); restore it or pass a new --checkpoint-dir"
        ) from None
    if not state_path.exists():
        raise CheckpointError(f"{state_path} is missing; restore it or pass a new --checkpoint-dir to start fresh")
    try:
        state = torch.load(str(state_path), weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{state_path} is unreadable ({type(e).__name__}); restore it or pass a new --checkpoint-dir"
        ) from None
    return shared, state
