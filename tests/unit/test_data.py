"""Training data (training/data.py): corpora in every supported format, streamed, packed, and resumable exactly."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tapestry_p2p.training.data import DataError, TokenStream, eval_windows, read_tokens
from tapestry_p2p.training.tokenizer import ByteTokenizer

DOCS = [f"document {i}: " + "word " * (i % 7 + 1) for i in range(40)]


def write_corpora(root):
    """The same 40 documents as .jsonl, .parquet and a saved `datasets` directory."""
    import datasets

    (root / "c.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in DOCS) + "\n")
    pq.write_table(pa.table({"body": DOCS}), root / "c.parquet", row_group_size=7)
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(root / "ds"))
    return [root / "c.jsonl", root / "c.parquet", root / "ds"]


def expected_tokens():
    tokenizer = ByteTokenizer()
    return [t for d in DOCS for t in tokenizer.encode(d) + tokenizer.separator]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    return write_corpora(tmp_path_factory.mktemp("corpora"))


def test_every_format_streams_the_same_documents_in_order_and_cycles(corpora):
    tokens = expected_tokens()
    for path in corpora:
        stream = TokenStream(path, ByteTokenizer(), block_size=15, batch_size=4, text_field="body")
        seen = []
        for _ in range(2 * len(tokens) // 64 + 3):  # more than two epochs
            x, y = stream.next()
            assert x.shape == y.shape == (4, 15)
            assert torch.equal(x[:, 1:], y[:, :-1])  # next-token targets
            seen.extend(torch.cat([x, y[:, -1:]], dim=1).flatten().tolist())
        assert seen[: len(tokens)] == tokens, path
        assert seen[len(tokens) : 2 * len(tokens)] == tokens, path  # the second epoch starts again from the first
        assert stream.epoch >= 2


def test_a_resumed_stream_continues_with_exactly_the_next_batch(corpora, tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n" * 30)
    for path in [*corpora, tmp_path / "a.txt"]:
        stream = TokenStream(path, ByteTokenizer(), block_size=9, batch_size=3, text_field="body")
        for _ in range(11):
            stream.next()
        state = stream.state_dict()
        expected = [stream.next() for _ in range(25)]
        resumed = TokenStream(path, ByteTokenizer(), block_size=9, batch_size=3, text_field="body")
        resumed.load_state_dict(state)
        for want, (x, y) in zip(expected, (resumed.next() for _ in range(25)), strict=True):
            assert torch.equal(want[0], x) and torch.equal(want[1], y), path


def test_a_txt_file_is_one_document_read_line_by_line(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "bonjour"}) + "\n\n" + json.dumps({"text": "hola"}))
    (tmp_path / "ignored.csv").write_text("x,y")
    tokens = read_tokens(tmp_path, ByteTokenizer(), max_tokens=1000)
    assert bytes(tokens.tolist()) == b"hello\nworld\n\n\nbonjour\n\nhola\n\n"
    windows = eval_windows(tokens, block_size=8, max_windows=4)
    assert windows[0].shape == (4, 8) and torch.equal(windows[0][:, 1:], windows[1][:, :-1])


def test_bad_data_is_one_line_naming_the_file_and_fix(tmp_path, corpora):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(DataError, match=r'bad.jsonl .* no string "text" field; pass --text-field'):
        TokenStream(bad, ByteTokenizer(), 4, 2).next()
    with pytest.raises(DataError, match=r"has no column 'text' \(it has body\); pass --text-field"):
        TokenStream(corpora[1], ByteTokenizer(), 4, 2).next()
    with pytest.raises(DataError, match=r"dataset .* has no column 'text'"):
        TokenStream(corpora[2], ByteTokenizer(), 4, 2).next()
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        TokenStream(tmp_path / "latin1.txt", ByteTokenizer(), 4, 2).next()
    (tmp_path / "tiny.txt").write_text("ab")
    with pytest.raises(DataError, match="fewer than"):
        TokenStream(tmp_path / "tiny.txt", ByteTokenizer(), 64, 16).next()
    with pytest.raises(DataError, match="does not exist"):
        TokenStream(tmp_path / "missing", ByteTokenizer(), 4, 2)
    stream = TokenStream(corpora[0], ByteTokenizer(), 4, 2, text_field="body")
    state = stream.state_dict()
    with pytest.raises(DataError, match="same --data"):
        TokenStream(corpora[1], ByteTokenizer(), 4, 2, text_field="body").load_state_dict(state)
