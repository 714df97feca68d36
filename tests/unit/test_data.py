"""Training data (training/data.py): text and JSON Lines files, resumable byte batches."""

from __future__ import annotations

import json

import pytest
import torch

from tapestry_p2p.training.data import ByteBatches, DataError, load_text_bytes


def test_data_from_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "bonjour"}) + "\n\n" + json.dumps({"text": "hola"}))
    (tmp_path / "ignored.csv").write_text("x,y")
    data = load_text_bytes(tmp_path, min_bytes=10)
    assert data == ("hello world " * 10 + "\n\nbonjour\n\nhola").encode()
    with pytest.raises(DataError, match="at least 1000"):
        load_text_bytes(tmp_path, min_bytes=1000)


def test_batches_are_next_byte_pairs_and_resumable():
    data = bytes(range(256)) * 4
    batches = ByteBatches(data, block_size=8, batch_size=4, seed=0)
    state = batches.state_dict()
    x, y = batches.next()
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    batches.load_state_dict(state)
    x2, _ = batches.next()
    assert torch.equal(x, x2)
