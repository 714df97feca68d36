"""Hugging Face models from local files, run specs, and export (training/hf.py, node/spec.py, training/export.py):
a tiny Llama-style model trains, checkpoints, resumes and exports to a directory that `transformers` loads alone."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from helpers import tapestry, write_run_spec, write_text, write_tiny_llama, write_tiny_tokenizer

from tapestry_p2p.node.config import NodeConfig
from tapestry_p2p.node.node import Node
from tapestry_p2p.node.spec import SpecError, canonical, config_fields, decode, digest_of, encode, first_difference
from tapestry_p2p.training import checkpoint
from tapestry_p2p.training.inner import InnerTrainer, TrainConfig
from tapestry_p2p.training.model import ModelConfig, build_model, weights
from tapestry_p2p.training.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A run spec of a tiny Llama with a BPE tokenizer trained here, a partner's data, and one solo round."""
    root = tmp_path_factory.mktemp("hf")
    data = write_text(root / "data.txt", seed=3, n_bytes=20000)
    (root / "model").mkdir()
    write_tiny_llama(root / "model", vocab_size=320)
    write_tiny_tokenizer(root / "model" / "tokenizer.json", [data.read_text()], vocab_size=300)
    spec = write_run_spec(
        root / "run.toml", "hf-run", 'huggingface = "model"\ntokenizer = "model/tokenizer.json"\nblock_size = 16'
    )
    config = NodeConfig(
        data=data, solo=True, max_rounds=2, checkpoint_dir=root / "ckpt", threads=1, **config_fields(spec)
    )
    node = Node(config)
    node.run()
    return root, config, node


def test_a_hugging_face_model_trains_checkpoints_and_resumes_exactly(hf_run):
    root, config, node = hf_run
    assert type(node.shared.model.lm).__name__ == "LlamaForCausalLM"
    names = weights(node.shared.model).keys()
    assert "lm.lm_head.weight" not in names  # tied to the embedding: each tensor once in checkpoints and averages
    assert node.shared.round == 2 and node.last_loss < 6.0
    resumed = Node(config)
    assert resumed.shared.hash() == node.shared.hash() and resumed.shared.round == 2
    assert resumed.trainer.batches.state_dict()["position"] == node.trainer.batches.state_dict()["position"]
    x, _ = resumed.trainer.batches.next()
    assert int(x.max()) < 320 and int(x.max()) > 255  # BPE ids, beyond the byte range


def test_export_loads_with_transformers_alone_and_gives_the_same_logits(hf_run):
    root, _, _ = hf_run
    assert tapestry("export", "--checkpoint-dir", str(root / "ckpt"), "--out", str(root / "export")).returncode == 0
    assert (root / "export" / "tokenizer.json").exists()
    model, _ = checkpoint.load_model(root / "ckpt")
    inputs = torch.arange(12).view(1, 12) * 7 % 300
    expected, _ = model(inputs)
    script = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(root / 'export')!r})\n"
        f"t = transformers.AutoTokenizer.from_pretrained({str(root / 'export')!r})\n"
        "assert not any(name.startswith('tapestry') for name in sys.modules)\n"
        f"logits = m(input_ids=torch.tensor({inputs.tolist()})).logits\n"
        f"torch.save(logits, {str(root / 'logits.pt')!r})\n"
        "print(len(t))\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "300"
    assert torch.allclose(torch.load(root / "logits.pt"), expected, atol=1e-5, rtol=0)
    assert tapestry("export", "--checkpoint-dir", str(root / "ckpt"), "--out", str(root / "export")).returncode == 2


def test_eval_prints_a_loss_per_corpus(hf_run):
    root, _, node = hf_run
    result = tapestry("eval", "--checkpoint-dir", str(root / "ckpt"), "--data", str(root / "data.txt"))
    assert result.returncode == 0
    loss, path = result.stdout.split()
    assert path == str(root / "data.txt") and 0 < float(loss) < 7


def test_the_spec_digest_ignores_where_files_are_and_names_the_first_difference(hf_run, tmp_path):
    root, config, _ = hf_run
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (moved / name).write_bytes((root / "model" / name).read_bytes())
    spec = write_run_spec(
        tmp_path / "run.toml",
        "hf-run",
        'huggingface = "elsewhere"\ntokenizer = "elsewhere/tokenizer.json"\nblock_size = 16',
    )
    other = NodeConfig(data=root / "data.txt", **config_fields(spec))
    assert digest_of(encode(other.spec())) == digest_of(encode(config.spec()))
    longer = dataclasses.replace(other, inner_steps=20, train=TrainConfig(batch_size=8))
    difference = first_difference(canonical(config.spec()), canonical(longer.spec()))
    assert difference == "inner_steps: 10 here, 20 there"
    gpt = dataclasses.replace(config, model=ModelConfig())
    assert first_difference(json.loads(encode(config.spec())), json.loads(encode(gpt.spec()))).startswith("model.")


def test_spec_files_and_flags_that_conflict_are_one_line_errors(tmp_path):
    assert tapestry("spec", "init", str(tmp_path / "run.toml"), "--run-id", "demo-run").returncode == 0
    shown = tapestry("spec", "show", str(tmp_path / "run.toml"))
    assert shown.returncode == 0 and "spec digest" in shown.stdout and "initial model" in shown.stdout
    pinned = tmp_path / "pinned.toml"
    pinned.write_text((tmp_path / "run.toml").read_text().replace("# initial_model", "initial_model"))
    assert tapestry("spec", "show", str(pinned)).returncode == 2
    data = write_text(tmp_path / "d.txt", seed=1)
    conflict = tapestry("join", "--run-spec", str(tmp_path / "run.toml"), "--data", str(data), "--inner-steps", "5")
    assert conflict.returncode == 2 and "--inner-steps is fixed by the run spec" in conflict.stderr
    (tmp_path / "bad.toml").write_text('run_id = "x"\nlisten = ["/ip4/127.0.0.1/tcp/0"]\n')
    with pytest.raises(SpecError, match="'listen', which is not part of a run spec"):
        config_fields(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text('run_id = "x"\n[model]\nn_layers = 2\n')
    with pytest.raises(SpecError, match=r"\[model\]"):
        config_fields(tmp_path / "typo.toml")


def test_gradient_accumulation_takes_the_same_step():
    batch = torch.tensor(ByteTokenizer().encode("the quick brown fox " * 10)[: 8 * 17]).view(8, 17)

    class OneBatch:  # the same batch every step, without files
        def next(self):
            return batch[:, :-1], batch[:, 1:]

    results = []
    for accum in (1, 4):
        model = build_model(ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=32), seed=0)
        trainer = InnerTrainer(model, OneBatch(), TrainConfig(batch_size=8), grad_accum=accum)
        loss = trainer.step()
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_peer_spec_is_used_only_if_it_is_small_json_and_matches_its_digest():
    good = b'{"inner_steps": 10}'
    assert decode(good, digest_of(good)) == {"inner_steps": 10}
    assert decode(good, "0" * 16) is None  # not what it claims to be
    deep = b"[" * 5000 + b"]" * 5000  # under the size cap, deeper than json's recursion limit
    assert decode(deep, digest_of(deep)) is None
    big = b'{"x": "' + b"a" * 9000 + b'"}'
    assert decode(big, digest_of(big)) is None
    long_value = {"model": {"config": "x" * 5000}}
    assert len(first_difference({"model": {"config": "abc"}}, long_value)) < 200
