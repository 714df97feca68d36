"""Text to token ids: UTF-8 bytes (the built-in GPT's, and any run that says `tokenizer = "bytes"`), or a Hugging Face
tokenizer from local files (`training.hf`). Documents are joined by the tokenizer's end-of-text token, or by a blank
line when it has none."""

from __future__ import annotations

from typing import Any, Protocol


class Tokenizer(Protocol):
    vocab_size: int
    separator: list[int]  # between two documents

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    vocab_size = 256

    def __init__(self) -> None:
        self.separator = list(b"\n\n")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        self.separator = [int(eos)] if eos is not None else self.encode("\n\n")

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))


def make_tokenizer(spec: str) -> Tokenizer:
    """`spec` is "bytes" or a local tokenizer directory / tokenizer.json."""
    if spec == "bytes":
        return ByteTokenizer()
    from tapestry_p2p.training.hf import load_tokenizer

    return HFTokenizer(load_tokenizer(spec))
