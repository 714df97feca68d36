"""A partner's own text, as bytes, and random training windows over it.

`--data` is a UTF-8 `.txt` or `.jsonl` file (one JSON object per line with a string `text` field), or a folder
searched recursively for such files. Nothing leaves the machine: only parameter deltas do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from tapestry_p2p.errors import UserError

SUFFIXES = (".txt", ".jsonl")


class DataError(UserError):
    """Unusable training data; the message names the file and the fix."""


def find_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"--data: {path} does not exist; pass a .txt/.jsonl file or a folder of them")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"--data: {path} is neither .txt nor .jsonl; rename it or convert it")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"--data: folder {path} holds no .txt or .jsonl files; put your text there")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--data: {path} is not UTF-8 (byte {e.start}); convert it, e.g. iconv -t UTF-8") from None


def _jsonl_texts(path: Path, text: str) -> Iterator[str]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"--data: {path}:{line_no} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'--data: {path}:{line_no} has no string "text" field; each line needs {{"text": ...}}')
        yield record["text"]


def load_text_bytes(path: Path, min_bytes: int) -> bytes:
    """All text under `path`, UTF-8 encoded, documents separated by blank lines."""
    parts: list[str] = []
    for file in find_files(path):
        text = _read_text(file)
        parts.extend(_jsonl_texts(file, text) if file.suffix == ".jsonl" else [text])
    data = "\n\n".join(p for p in parts if p.strip()).encode("utf-8")
    if len(data) < min_bytes:
        raise DataError(f"--data: {path} holds {len(data)} bytes of text, at least {min_bytes} are needed; add text")
    return data


class ByteBatches:
    """Random windows of `block_size + 1` bytes; the generator's state is part of a checkpoint."""

    def __init__(self, data: bytes, block_size: int, batch_size: int, seed: int) -> None:
        if len(data) < block_size + 2:
            raise DataError(f"need more than {block_size + 1} bytes of text for a block of {block_size}")
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.block_size, self.batch_size = block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.data) - self.block_size - 1, (self.batch_size,), generator=self.generator)
        windows = torch.stack([self.data[s : s + self.block_size + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]  # inputs, next-byte targets; (batch, block_size) each

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def eval_windows(data: bytes, block_size: int, max_windows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced, non-random windows for a held-out loss that is comparable across models."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    last = len(tokens) - block_size - 1
    if last <= 0:
        raise DataError(f"held-out text is shorter than {block_size + 2} bytes")
    starts = torch.linspace(0, last, min(max_windows, last + 1)).long().tolist()
    windows = torch.stack([tokens[s : s + block_size + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:]
