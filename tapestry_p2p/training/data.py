"""A partner's own corpus, read as a stream of documents, tokenized and packed into training sequences.

`--data` is a `.txt`, `.jsonl` or `.parquet` file, a folder searched recursively for such files, or a Hugging Face
`datasets` directory saved with `save_to_disk` (its Arrow files are memory-mapped). Records are read one at a time,
so a corpus larger than memory works: a `.txt` line by line, a `.jsonl` line by line (each a JSON object whose
`--text-field`, default `text`, is a string), a `.parquet` file in row batches, a `datasets` directory by row. The
corpus cycles: after its last record the stream starts again from the first (the next epoch).

`TokenStream` packs documents (joined by the tokenizer's separator) into non-overlapping windows of `block_size + 1`
tokens; a batch is `batch_size` consecutive windows. Its position (file, record, epoch, tokens read but not yet used)
is part of a checkpoint, so a resumed partner continues with exactly the batch it would have trained next. Nothing
leaves the machine: only parameter deltas do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tapestry_p2p.errors import UserError
from tapestry_p2p.training.tokenizer import Tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet")
ROW_BATCH = 1024  # rows read at once from a parquet file or a datasets directory


class DataError(UserError):
    """Unusable training data; the message names the file and the fix."""


def is_dataset_dir(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk`."""
    return path.is_dir() and (path / "dataset_info.json").exists() and (path / "state.json").exists()


def find_sources(path: Path) -> list[Path]:
    """The files (or the one datasets directory) `--data PATH` names, in a fixed order."""
    if not path.exists():
        raise DataError(f"--data: {path} does not exist; pass a .txt/.jsonl/.parquet file, a folder, or a dataset")
    if is_dataset_dir(path):
        return [path]
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"--data: {path} is not .txt, .jsonl or .parquet; convert it or save it as a dataset")
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not found:
        raise DataError(f"--data: folder {path} holds no .txt, .jsonl or .parquet files; put your text there")
    return found


class Record(NamedTuple):
    position: int  # where the next record starts: a byte offset in .txt and .jsonl files, a row number otherwise
    text: str
    ends_document: bool  # a .jsonl line, parquet row or dataset row is a document; a .txt file is one document


def iter_texts(source: Path, start: int, text_field: str) -> Iterator[Record]:
    """The records of `source` from position `start`."""
    if is_dataset_dir(source):
        yield from _dataset_texts(source, start, text_field)
    elif source.suffix == ".parquet":
        yield from _parquet_texts(source, start, text_field)
    else:
        yield from _line_texts(source, start, text_field, jsonl=source.suffix == ".jsonl")


def _line_texts(path: Path, start: int, field: str, jsonl: bool) -> Iterator[Record]:
    size = path.stat().st_size
    if start > size:  # past the end-of-document record of a .txt file
        return
    with path.open("rb") as file:
        file.seek(start)
        offset = start
        for raw in file:
            offset += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(
                    f"--data: {path} is not UTF-8 (byte {offset - len(raw)}); convert it, e.g. iconv -t UTF-8"
                ) from None
            if not jsonl:
                yield Record(offset, line, False)
            elif line.strip():
                text = _field(json_record(path, line, offset), path, field, f"byte {offset - len(raw)}")
                yield Record(offset, text, True)
    if not jsonl:
        yield Record(size + 1, "", True)  # the file ends its document


def json_record(path: Path, line: str, offset: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"--data: {path} (line ending at byte {offset}) is not valid JSON ({e.msg}); fix it") from None


def _field(record: Any, path: Path, field: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise DataError(f'--data: {path} ({where}) has no string "{field}" field; pass --text-field NAME')
    return str(record[field])


def _parquet_texts(path: Path, start: int, field: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 (pyarrow raises several types for unreadable files; all mean the same)
        raise DataError(f"--data: {path} is not a readable parquet file ({type(e).__name__}); re-export it") from None
    if field not in parquet.schema_arrow.names:
        columns = ", ".join(parquet.schema_arrow.names)
        raise DataError(f"--data: {path} has no column {field!r} (it has {columns}); pass --text-field NAME")
    row = 0
    for batch in parquet.iter_batches(batch_size=ROW_BATCH, columns=[field]):
        texts = batch.column(0).to_pylist()
        for text in texts:
            row += 1
            if row <= start:
                continue
            if not isinstance(text, str):
                raise DataError(f"--data: {path} row {row - 1}: column {field!r} is not text; pass --text-field NAME")
            yield Record(row, text, True)


def _dataset_texts(path: Path, start: int, field: str) -> Iterator[Record]:
    import datasets

    datasets.disable_progress_bars()
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"--data: {path} holds several splits; pass one of them (e.g. {path}/train)")
    if field not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise DataError(f"--data: dataset {path} has no column {field!r} (it has {columns}); pass --text-field NAME")
    column = dataset.select_columns([field])
    for first in range(start, len(column), ROW_BATCH):
        for i, text in enumerate(column[first : first + ROW_BATCH][field]):
            if not isinstance(text, str):
                raise DataError(f"--data: dataset {path} row {first + i}: {field!r} is not text; pass --text-field")
            yield Record(first + i + 1, text, True)


def _tokens(tokenizer: Tokenizer, record: Record) -> list[int]:
    tokens = tokenizer.encode(record.text) if record.text else []
    return tokens + tokenizer.separator if record.ends_document else tokens


class TokenStream:
    """Batches of (inputs, next-token targets), each `(batch_size, block_size)`, from a corpus read in order."""

    def __init__(
        self,
        path: Path,
        tokenizer: Tokenizer,
        block_size: int,
        batch_size: int,
        text_field: str = "text",
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.sources = find_sources(path)
        self.rank, self.world = shard  # a torchrun partner: each rank reads every batch and keeps its own
        self.tokenizer, self.block_size, self.batch_size, self.text_field = (
            tokenizer,
            block_size,
            batch_size,
            text_field,
        )
        self.source, self.position, self.epoch = 0, 0, 0
        self.buffer: list[int] = []
        self._texts: Iterator[Record] = iter(())
        self._restart_reader()
        self._fill((block_size + 1) * batch_size * self.world)  # unusable data fails here, not at the first step

    def _restart_reader(self) -> None:
        self._texts = iter_texts(self.sources[self.source], self.position, self.text_field)

    def _read_document(self) -> None:
        """Append the next record's tokens (and a separator) to the buffer, moving to the next file as needed."""
        tried = 0
        while True:
            record = next(self._texts, None)
            if record is not None:
                self.position = record.position
                tokens = _tokens(self.tokenizer, record)
                if tokens:
                    self.buffer.extend(tokens)
                    return
                continue
            self.source, self.position = (self.source + 1) % len(self.sources), 0
            if self.source == 0:
                self.epoch += 1
                tried += 1
                if tried > 1:  # a whole pass without one non-empty record
                    raise DataError(f"--data: {self.sources[0]} holds no text; add some")
            self._restart_reader()

    def _fill(self, need: int) -> None:
        epoch_at_start = self.epoch
        while len(self.buffer) < need:
            self._read_document()
            if self.epoch > epoch_at_start + 1:
                raise DataError(
                    f"--data holds fewer than {need} tokens, one batch of {self.batch_size} x {self.block_size + 1}; "
                    "add text"
                )

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; under torchrun, rank r of W keeps the r-th of the next W batches (the same position on
        every rank, so one checkpoint resumes them all)."""
        window = self.block_size + 1
        need = window * self.batch_size
        self._fill(need * self.world)
        start = need * self.rank
        tokens = torch.tensor(self.buffer[start : start + need], dtype=torch.long).view(self.batch_size, window)
        del self.buffer[: need * self.world]
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "position": self.position,
            "epoch": self.epoch,
            "buffer": torch.tensor(self.buffer, dtype=torch.long),
            "files": [str(s) for s in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        files = [str(s) for s in self.sources]
        if state["files"] != files:
            raise DataError(
                f"--data names other files than the checkpoint was reading ({len(state['files'])} then, "
                f"{len(files)} now): pass the same --data to continue where it stopped, or a new --checkpoint-dir"
            )
        self.source, self.position, self.epoch = int(state["source"]), int(state["position"]), int(state["epoch"])
        self.buffer = [int(t) for t in state["buffer"].tolist()]
        self._restart_reader()


def read_tokens(path: Path, tokenizer: Tokenizer, max_tokens: int, text_field: str = "text") -> torch.Tensor:
    """Up to `max_tokens` tokens from the start of a held-out corpus (one pass, no cycling)."""
    tokens: list[int] = []
    for source in find_sources(path):
        for record in iter_texts(source, 0, text_field):
            tokens.extend(_tokens(tokenizer, record))
            if len(tokens) >= max_tokens:
                return torch.tensor(tokens[:max_tokens], dtype=torch.long)
    return torch.tensor(tokens, dtype=torch.long)


def eval_windows(tokens: torch.Tensor, block_size: int, max_windows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced, non-random windows for a held-out loss that is comparable across models."""
    last = len(tokens) - block_size - 1
    if last <= 0:
        raise DataError(f"held-out text is shorter than {block_size + 2} tokens")
    starts = torch.linspace(0, last, min(max_windows, last + 1)).long().tolist()
    windows = torch.stack([tokens[s : s + block_size + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:]
