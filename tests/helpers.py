"""Helpers the test modules share (test modules never import each other): data, `join` arguments, the CLI in-process,
and reading what nodes wrote."""

from __future__ import annotations

import contextlib
import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from hivemind.dht.crypto import RSASignatureValidator

from tapestry_p2p.app.cli import main
from tapestry_p2p.node.metrics import read_jsonl
from tapestry_p2p.p2p.dht import DHT, DHTOptions, start_dht, stop_dht
from tapestry_p2p.security.dht_auth import owner_subkey
from tapestry_p2p.security.identity import ephemeral_identity, signing_key
from tapestry_p2p.testing.corpus import write_text
from tapestry_p2p.testing.local_swarm import LOOPBACK, TINY_MODEL, LocalSwarm

ROUNDS = 3
ROUND_WINDOW = 3  # seconds (`--round-window`)
FAULTY_JOIN = Path(__file__).resolve().parent / "faulty_join.py"


def faulty(*flags: str) -> tuple[str, ...]:
    """The `program` of a LocalSwarm process that runs `tapestry join` with a fault (tests/faulty_join.py flags)."""
    return (str(FAULTY_JOIN), *flags)


def join_args(tmp_path: Path, name: str, seed: int, bootstrap: Optional[str], rounds: int = ROUNDS, *extra: str):
    """`tapestry join` arguments for a small partner `name` with its own data, metrics and checkpoint in tmp_path;
    `extra` flags come last, so they win."""
    folder = tmp_path / name
    folder.mkdir()
    options = {
        "--run-id": "e2e",
        "--data": write_text(folder / "data.txt", seed),
        "--listen": LOOPBACK,
        "--partner": name,
        "--max-rounds": rounds,
        "--inner-steps": 10,
        "--threads": 1,
        "--round-window": ROUND_WINDOW,
        "--metrics": folder / "metrics.jsonl",
        "--checkpoint-dir": folder / "ckpt",
    }
    if bootstrap:
        options["--initial-peers"] = bootstrap
    return ["join", *(str(x) for pair in options.items() for x in pair), *TINY_MODEL, *extra]


def start_signed_dht(stack: contextlib.ExitStack, initial_peers: list[str]) -> tuple[DHT, bytes]:
    """A real DHT node on loopback with an RSA identity that signs its records, as a partner's node has (stopped when
    `stack` closes); returns it and its owner-signed subkey."""
    identity = stack.enter_context(ephemeral_identity())
    key = signing_key(identity)
    options = DHTOptions(
        initial_peers=initial_peers,
        listen=[LOOPBACK],
        identity=identity,
        record_validators=[RSASignatureValidator(key)],
    )
    dht = start_dht(options)
    stack.callback(stop_dht, dht)
    return dht, owner_subkey(key)


# Makes bitsandbytes believe the CPU has AVX512-BF16 (as some machines of our kind do): on import, it then tries its
# optional `kernels` package and logs a warning when that is missing. As a sitecustomize.py on PYTHONPATH, it applies
# to every Python process of a tree (spawned workers included).
AVX512_BF16 = """
import importlib.abc, importlib.util, sys
class _Avx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.lib.has_avx512bf16_cpu = lambda: True
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, _Avx512Bf16())
"""


def avx512_bf16_everywhere(folder: Path) -> dict[str, str]:
    """The environment under which every Python process started from it runs on a (simulated) AVX512-BF16 CPU."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(AVX512_BF16)
    return {"PYTHONPATH": str(folder)}


# What our own terminal output looks like: log records of our loggers (cli.setup_logging's format), and the lines
# our commands print. Anything else that looks like a dependency talking fails `foreign_lines`.
_OUR_LOG = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) tapestry_p2p[.\w]*: ")
_ANY_LOG = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")
_FOREIGN = (
    re.compile(r"^[A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d\.\d+ \[(DEBUG|INFO|WARN|ERROR|CRITICAL)\]"),  # hivemind's format
    re.compile(r"\b\w*Warning: "),  # Python's warnings
    re.compile(r"^Traceback \(most recent call last\)"),
    re.compile(r"kernels-community|bitsandbytes"),
)


def foreign_lines(text: str) -> list[str]:
    """The lines of a process's terminal output that are not ours: a dependency's log record or warning."""
    foreign = []
    for line in text.splitlines():
        if _OUR_LOG.match(line):
            continue
        if _ANY_LOG.match(line) or any(p.search(line) for p in _FOREIGN):
            foreign.append(line)
    return foreign


def metrics(tmp_path: Path, name: str) -> list:
    return read_jsonl(tmp_path / name / "metrics.jsonl")


def run_to_completion(procs: LocalSwarm, names: dict, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    for name, popen in names.items():
        try:
            popen.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish: {procs.log(name)[-2000:]}")
        assert popen.returncode == 0, procs.log(name)[-2000:]


def wait_for_log(procs: LocalSwarm, name: str, popen: subprocess.Popen, text: str, timeout: float) -> None:
    """Wait until `text` is in the log of `name` (fails if the process exits first, or on timeout)."""
    deadline = time.monotonic() + timeout
    while text not in procs.log(name):
        if popen.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{name} never logged {text!r}: {procs.log(name)[-2000:]}")
        time.sleep(0.2)


def tapestry(*args: str) -> subprocess.CompletedProcess:
    """`tapestry ARGS` through `cli.main`, in this process; an unexpected exception propagates (and fails the test)."""
    out, err = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    except SystemExit as e:
        code = e.code
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def tapestry_process(*args: str, timeout: float = 60, prelude: str = "") -> subprocess.CompletedProcess:
    """The real `python -m tapestry_p2p ARGS` (after running `prelude`, Python code, in the same interpreter)."""
    command = [sys.executable, "-m", "tapestry_p2p", *args]
    if prelude:
        run = "import runpy, sys; sys.argv[0] = 'tapestry'; runpy.run_module('tapestry_p2p', run_name='__main__')"
        command = [sys.executable, "-c", prelude + "\n" + run, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_tiny_llama(folder: Path, vocab_size: int = 256) -> Path:
    """A Llama-style config.json (no weights: a run initialises it from its seed), tied embeddings, ~60k parameters."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    config.save_pretrained(folder)
    return folder


def write_tiny_tokenizer(path: Path, corpus: list[str], vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer trained here on `corpus`, saved as one tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(path))
    return path


def write_run_spec(path: Path, run_id: str, model: str, inner_steps: int = 10, extra: str = "") -> Path:
    """A run spec with a small batch; `model` is the body of its [model] section."""
    path.write_text(
        f'run_id = "{run_id}"\ninner_steps = {inner_steps}\ncompression = "8bit"\n{extra}\n'
        f"[model]\n{model}\n[train]\nbatch_size = 4\nlr = 3e-3\n"
    )
    return path
