"""Held-out evaluation of a checkpoint's shared model: mean next-token loss on each of a few corpora (`tapestry eval`).

The windows are evenly spaced over the first tokens of each corpus, not random, so losses are comparable between
models and runs; the demo's comparison table is this evaluation of its partners' checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from tapestry_p2p.training.checkpoint import load_model
from tapestry_p2p.training.data import eval_windows, read_tokens
from tapestry_p2p.training.inner import evaluate
from tapestry_p2p.training.model import tokenizer_of
from tapestry_p2p.training.tokenizer import make_tokenizer

MAX_WINDOWS = 64  # windows per corpus


def held_out_losses(checkpoint_dir: Path, corpora: list[Path], text_field: str = "text") -> dict[Path, float]:
    """The checkpoint's shared model's mean loss (nats per token) on each corpus."""
    model, config = load_model(checkpoint_dir)
    tokenizer = make_tokenizer(tokenizer_of(config))
    window = config.block_size + 1
    losses = {}
    for corpus in corpora:
        tokens = read_tokens(corpus, tokenizer, max_tokens=window * MAX_WINDOWS * 4, text_field=text_field)
        losses[corpus] = evaluate(model, eval_windows(tokens, config.block_size, MAX_WINDOWS))
    return losses
