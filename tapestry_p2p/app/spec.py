"""`tapestry spec init|show`: write a run spec template, and print a spec's digest and initial-model hash (format and
rules: `node.spec`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tapestry_p2p.files import atomic_write
from tapestry_p2p.node.config import RUN_ID_PATTERN, RUN_ID_RULE, NodeConfig, run_seed
from tapestry_p2p.node.spec import TEMPLATE, SpecError, config_fields, digest_of, encode
from tapestry_p2p.training.model import build_model
from tapestry_p2p.training.outer import SharedModel


def init_spec(path: Path, run_id: str, out: Any) -> int:
    if path.exists():
        raise SpecError(f"{path} already exists; edit it, or pick another file name")
    if not RUN_ID_PATTERN.match(run_id):
        raise SpecError(f"--run-id {run_id!r} {RUN_ID_RULE}")
    text = TEMPLATE.format(run_id=run_id, seed=run_seed(run_id))
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    out.print(f"wrote {path}; edit it, then `tapestry spec show {path}` and send it to every partner", markup=False)
    return 0


def show_spec(path: Path, out: Any) -> int:
    config = NodeConfig(data=Path("."), **config_fields(path))
    digest = digest_of(encode(config.spec()))
    initial = SharedModel(build_model(config.model, config.model_seed), config.outer).hash()
    out.print(f"run {config.run_id}", markup=False, highlight=False)
    out.print(f"spec digest    {digest}", markup=False, highlight=False)
    out.print(f"initial model  {initial}", markup=False, highlight=False)
    if config.initial_model and config.initial_model != initial:
        raise SpecError(
            f"{path} pins initial_model = {config.initial_model!r}, but these model files hash to {initial}"
        )
    return 0
