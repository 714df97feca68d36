"""`tapestry export`: a checkpoint's shared model as a directory other tools load without tapestry.

A Hugging Face model becomes a standard model directory (`config.json`, safetensors weights, the tokenizer's files):
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it, the start of a partner's own derivative. The
built-in GPT becomes `model.safetensors` plus `config.json` (its `ModelConfig`), which the README's ten-line loader
reads. The directory is written under a temporary name and renamed when complete, so a failed export leaves nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from tapestry_p2p.errors import UserError
from tapestry_p2p.training.checkpoint import load_model
from tapestry_p2p.training.hf import CausalLM, HFModelConfig, load_tokenizer
from tapestry_p2p.training.model import ModelConfig, weights


class ExportError(UserError):
    """An export that cannot be written; the message names the fix."""


def export(checkpoint_dir: Path, out: Path) -> str:
    """Write the shared model of `checkpoint_dir` to the new directory `out`; returns what was written."""
    if out.exists():
        raise ExportError(f"--out {out} already exists; pass a new directory")
    model, config = load_model(checkpoint_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if isinstance(model, CausalLM) and isinstance(config, HFModelConfig):
            model.lm.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]
            if config.tokenizer != "bytes":
                load_tokenizer(config.tokenizer).save_pretrained(tmp)
            kind = "a Hugging Face model directory"
        else:
            assert isinstance(config, ModelConfig)
            tensors = {name: t.contiguous() for name, t in weights(model).items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps({"tapestry_gpt": dataclasses.asdict(config)}, indent=2))
            kind = "the built-in GPT (model.safetensors + config.json)"
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return kind
