"""A small byte-level GPT (after nanoGPT): one config dataclass and a few small modules, pure PyTorch.

Bytes are tokens (vocabulary 256), so any partner's UTF-8 text works without a shared tokenizer. No weight tying, so
`state_dict()` names each tensor once (checkpoints are plain safetensors). Sizes for 2 CPU threads: the default
(~0.8M parameters) trains at ~20k tokens/s; n_layer=6, n_embd=256 (~4.8M) at ~5k tokens/s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from tapestry_p2p.training.hf import CausalLM, HFModelConfig, ModelError, build_hf_model

VOCAB_SIZE = 256  # bytes


@dataclass
class ModelConfig:
    """`[model]` of a run that trains the built-in GPT."""

    block_size: int = 64  # context length in bytes
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # batch, time, channels
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(VOCAB_SIZE, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, VOCAB_SIZE, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape  # batch, time (bytes)
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, n_embd)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, 256)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))


AnyModelConfig = Union[ModelConfig, HFModelConfig]


def build_model(config: AnyModelConfig, seed: int) -> nn.Module:
    """The initial model of a run: every peer of the run builds the same weights from the same seed (or, for a
    Hugging Face directory with weights, loads the same bytes)."""
    if isinstance(config, HFModelConfig):
        return build_hf_model(config, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(config)


def model_config_from_dict(values: dict[str, Any]) -> AnyModelConfig:
    """The `[model]` section of a config or run spec, or a checkpoint's record of it: `huggingface = PATH` selects a
    Hugging Face model, anything else configures the built-in GPT."""
    if "huggingface" in values:
        return HFModelConfig(**values)
    return ModelConfig(**values)


def describe(config: AnyModelConfig) -> dict[str, Any]:
    """The config as plain values (a checkpoint records it)."""
    return config.describe() if isinstance(config, HFModelConfig) else dataclasses.asdict(config)


def tokenizer_of(config: AnyModelConfig) -> str:
    return config.tokenizer if isinstance(config, HFModelConfig) else "bytes"


def check_vocabulary(model: nn.Module, tokenizer_vocab: int) -> None:
    """A model must have an embedding row for every token its tokenizer produces."""
    if isinstance(model, CausalLM):
        rows = int(model.lm.get_input_embeddings().num_embeddings)  # type: ignore[operator]
    else:
        rows = VOCAB_SIZE
    if rows < tokenizer_vocab:
        raise ModelError(
            f"[model]: the model has {rows} token embeddings but its tokenizer produces {tokenizer_vocab} ids; "
            "use the tokenizer the model was made for, or a model config with vocab_size >= it"
        )


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by name, each tensor once (a tied embedding appears under its first name)."""
    return {name: p.detach() for name, p in model.named_parameters()}


@torch.no_grad()
def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` (as `weights` names them) into the model; every parameter must be there, with its shape."""
    params = dict(model.named_parameters())
    if params.keys() != tensors.keys():
        name = sorted(params.keys() ^ tensors.keys())[0]
        raise ValueError(f"tensor {name} is {'missing' if name in params else 'not part of this model'}")
    for name, p in params.items():
        if p.shape != tensors[name].shape:
            raise ValueError(f"tensor {name} has shape {tuple(tensors[name].shape)}, the model {tuple(p.shape)}")
        p.copy_(tensors[name])
