"""Hugging Face causal language models and tokenizers, from local files only.

A run may train any `transformers` causal LM instead of the built-in GPT: `HFModelConfig.path` is a local directory
(its `config.json`, and its weights when it has any) or a local `config.json` (random initialisation from the run's
seed). Nothing is downloaded: the project's machines have no hub access, and a consortium's starting weights are a
file its partners agreed on, not whatever a hub serves today. `transformers` is imported only when such a model is
used (it takes seconds to import).

`CausalLM` wraps the transformers model so the rest of tapestry sees the built-in GPT's interface: `model(inputs,
targets) -> (logits, loss)` with next-token targets already shifted (`training.data` packs them so).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tapestry_p2p.errors import UserError

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


class ModelError(UserError):
    """A model or tokenizer that cannot be used; the message names the file and the fix."""


@dataclass
class HFModelConfig:
    """`[model]` of a run that trains a Hugging Face causal LM."""

    huggingface: Path  # a local model directory, or a local config.json
    tokenizer: str = "bytes"  # "bytes" (UTF-8 bytes as tokens), or a local tokenizer directory or tokenizer.json
    block_size: int = 512  # sequence length in tokens

    def __post_init__(self) -> None:
        self.huggingface = Path(self.huggingface)
        if self.block_size <= 0:
            raise ValueError(f"model.block_size must be a positive integer, got {self.block_size}")

    @property
    def config_file(self) -> Path:
        return self.huggingface / "config.json" if self.huggingface.is_dir() else self.huggingface

    @property
    def has_weights(self) -> bool:
        return self.huggingface.is_dir() and any((self.huggingface / name).exists() for name in WEIGHT_FILES)

    def fingerprint(self) -> dict[str, Any]:
        """What peers must share, without local paths: the config's and the tokenizer files' content hashes."""
        return {
            "kind": "huggingface",
            "config": _file_digest(self.config_file),
            "tokenizer": "bytes" if self.tokenizer == "bytes" else _files_digest(Path(self.tokenizer)),
            "block_size": self.block_size,
        }

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "huggingface": str(self.huggingface)}


def _quiet_transformers() -> Any:
    """Import transformers offline and without its warnings (the CLI owns the terminal)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise ModelError(f"[model]: cannot read {path} ({e.strerror}); give a local file that exists") from None


def _files_digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.glob("*") if p.name in TOKENIZER_FILES)
    if not files:
        raise ModelError(f"[model] tokenizer: {path} holds no tokenizer.json; give a tokenizer directory or 'bytes'")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(bytes.fromhex(_file_digest(file)))
    return digest.hexdigest()[:16]


class CausalLM(nn.Module):
    """A transformers causal LM behind the built-in GPT's interface."""

    def __init__(self, lm: nn.Module, block_size: int) -> None:
        super().__init__()
        self.lm = lm
        self.block_size = block_size

    def forward(
        self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        logits = self.lm(input_ids=idx, use_cache=False).logits
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def build_hf_model(config: HFModelConfig, seed: int) -> CausalLM:
    """The run's initial model: the directory's weights if it has any, else the config initialised from `seed`."""
    transformers = _quiet_transformers()
    try:
        if config.has_weights:
            lm = transformers.AutoModelForCausalLM.from_pretrained(
                config.huggingface, local_files_only=True, dtype=torch.float32
            )
        else:
            hf_config = transformers.AutoConfig.from_pretrained(config.config_file, local_files_only=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                lm = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ModelError(
            f"[model] huggingface = {config.huggingface}: not a causal LM transformers can load offline ({first}); "
            "give a local directory with config.json (and weights), or a config.json"
        ) from None
    return CausalLM(lm, config.block_size)


def load_tokenizer(spec: str) -> Any:
    """A transformers tokenizer from a local directory or tokenizer.json."""
    transformers = _quiet_transformers()
    path = Path(spec)
    try:
        if path.is_file():
            return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ModelError(
            f"[model] tokenizer = {spec}: not a tokenizer transformers can load offline ({first}); "
            "give a directory with tokenizer.json, a tokenizer.json, or 'bytes'"
        ) from None
