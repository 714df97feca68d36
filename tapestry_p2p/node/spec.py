"""The run spec: what every partner of a run shares (`run.toml`), its digest, and the first field two specs differ in.

A spec fixes the run id, the model (`[model]`: the built-in GPT's sizes, or `huggingface = DIR` with its tokenizer and
sequence length), the inner optimizer and batch (`[train]`), H (`inner_steps`), the outer optimizer (`[outer]`), the
codec (`compression`) and the starting weights (`seed` for a random initialisation, and optionally `initial_model`,
the hash every partner's initial model must have). Everything a partner decides alone (data, identity, addresses,
device, checkpoints, gradient accumulation) stays in its own `--config` or flags.

The digest is a hash of the spec's content, not of its file: local paths are replaced by the hashes of the files they
name (a Hugging Face `config.json`, the tokenizer's files), so two partners who keep the model in different folders
share one digest. Peers of different digests are never matched for averaging (the digest is part of the averager's
schema), and a node that sees a peer of its run with another digest reads that peer's spec from the DHT and names
the first field that differs.

Without `--run-spec` (the quick-start: `--run-id` and the built-in model's flags) the same fields come from the flags,
and the node's spec is built from them the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

from tapestry_p2p.errors import UserError
from tapestry_p2p.training.hf import HFModelConfig
from tapestry_p2p.training.inner import TrainConfig
from tapestry_p2p.training.model import AnyModelConfig, model_config_from_dict
from tapestry_p2p.training.outer import OuterConfig

TOP_LEVEL = ("run_id", "inner_steps", "compression", "seed", "initial_model")
SECTIONS = ("model", "train", "outer")
MAX_SPEC_BYTES = 8192  # a spec's canonical JSON is a few hundred bytes; a peer's claim of more is refused


class SpecError(UserError):
    """An unusable run spec; the message names the field and the fix."""


def read_spec(path: Path) -> dict[str, Any]:
    """The NodeConfig fields a spec file sets. Relative paths in `[model]` are relative to the spec file."""
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"--run-spec: cannot read {path} ({e.strerror}); check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"--run-spec: {path} is not valid TOML ({e}); fix it, or run `tapestry spec init`") from None
    unknown = sorted(set(values) - set(TOP_LEVEL) - set(SECTIONS))
    if unknown:
        raise SpecError(
            f"--run-spec: {path} sets {unknown[0]!r}, which is not part of a run spec (allowed: "
            f"{', '.join(TOP_LEVEL + SECTIONS)}); a partner's own settings go in its --config"
        )
    for name in SECTIONS:
        if name in values and not isinstance(values[name], dict):
            raise SpecError(f"--run-spec: {path}: {name} must be a [{name}] section")
    model = dict(values.get("model", {}))
    for key in ("huggingface", "tokenizer"):
        if key in model and isinstance(model[key], str) and model[key] != "bytes":
            model[key] = str((path.parent / model[key]).resolve())
    if model:
        values["model"] = model
    return values


def config_fields(path: Path) -> dict[str, Any]:
    """The NodeConfig keyword arguments a spec file sets (its sections built into their config dataclasses)."""
    values = read_spec(path)
    if not isinstance(values.get("run_id"), str):
        raise SpecError(f'--run-spec: {path} has no run_id; add run_id = "NAME" at the top')
    fields: dict[str, Any] = {k: values[k] for k in TOP_LEVEL if k in values}
    builders = {
        "model": model_config_from_dict,
        "train": lambda v: TrainConfig(**v),
        "outer": lambda v: OuterConfig(**v),
    }
    for name, build in builders.items():
        try:
            fields[name] = build(values.get(name, {}))
        except TypeError as e:  # an unknown key in the section
            raise SpecError(f"--run-spec: {path}: [{name}] {str(e).split('__init__() ')[-1]}") from None
        except ValueError as e:
            raise SpecError(f"--run-spec: {path}: {e}") from None
    fields["run_spec"] = path
    return fields


def canonical(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec as plain values, with local files replaced by their content hashes (see the module docstring)."""
    out = dict(spec)
    model: AnyModelConfig = out["model"]
    out["model"] = model.fingerprint() if isinstance(model, HFModelConfig) else {"kind": "gpt", **_plain(model)}
    for name in ("train", "outer"):
        out[name] = _plain(out[name])
    return out


def _plain(config: Any) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}


def encode(spec: dict[str, Any]) -> bytes:
    """The canonical spec as compact JSON (what the DHT carries)."""
    return json.dumps(canonical(spec), sort_keys=True, separators=(",", ":")).encode()


def digest_of(encoded: bytes) -> str:
    return hashlib.sha256(encoded).hexdigest()[:16]


def decode(raw: Any, digest: str) -> dict[str, Any] | None:
    """A peer's spec from the DHT (untrusted): only if it is small, JSON and hashes to the digest it is stored under."""
    if not isinstance(raw, bytes) or len(raw) > MAX_SPEC_BYTES or digest_of(raw) != digest:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors; deep nesting
        return None
    return value if isinstance(value, dict) else None


def first_difference(ours: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> str:
    """`field: X here, Y there` for the first field (in sorted order) that differs; "" if none does."""
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:  # `theirs` comes from a peer: its values are shown JSON-escaped and cut short
            return f"{prefix}{key}: {json.dumps(a)[:80]} here, {json.dumps(b)[:80]} there"
    return ""


TEMPLATE = """\
# A run spec: what every partner of the run shares. Send this file to every partner; each joins with
#   tapestry join --run-spec run.toml --data THEIR_DATA ...
# `tapestry spec show run.toml` prints its digest (partners compare it) and the initial model's hash.
# A partner's own settings (data, identity, addresses, device, checkpoints, --grad-accum) are not part of it.

run_id = "{run_id}"
inner_steps = 50          # H: inner steps per outer round
compression = "8bit"      # the codec of the pseudo-gradients on the wire: 8bit, 4bit, fp16 or none
seed = {seed}             # seeds the initial model when [model] has no weights
# initial_model = "..."   # pin: the hash `tapestry spec show` prints; a partner whose initial model differs stops

[model]
# The built-in byte-level GPT:
block_size = 64           # sequence length (bytes)
n_layer = 4
n_head = 4
n_embd = 128
# Or a Hugging Face causal LM from local files (paths relative to this file), instead of the four lines above:
# huggingface = "models/my-llama"   # a directory with config.json (and weights to start from), or a config.json
# tokenizer = "models/my-llama"     # a directory with tokenizer.json, a tokenizer.json, or "bytes"
# block_size = 512                  # sequence length (tokens)

[train]
batch_size = 16           # sequences per inner step (a partner may reach it with --grad-accum)
lr = 3e-3                 # inner AdamW
weight_decay = 0.1
grad_clip = 1.0

[outer]
lr = 0.7                  # outer Nesterov SGD (DiLoCo's settings)
momentum = 0.9
"""
