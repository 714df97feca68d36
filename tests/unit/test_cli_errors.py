"""Mistakes a user will make: each is one line on stderr naming the fix, exit status 2, no traceback.

Most cases call the CLI's entry point in this process (`tapestry`): they fail before any process or network starts,
and a subprocess would spend its time importing torch. `tapestry_process` runs the real `python -m tapestry_p2p`,
for the cases that start a DHT and to check the entry point itself.
"""

from __future__ import annotations

import logging
import socket
import time

import pytest
from helpers import AVX512_BF16, assert_user_error, tapestry, tapestry_process, write_text

from tapestry_p2p.p2p import hivemind_compat
from tapestry_p2p.security.identity import load_or_create_identity


@pytest.fixture
def data(tmp_path):
    return str(write_text(tmp_path / "data.txt", seed=0))


@pytest.fixture
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_malformed_multiaddr_on_a_cpu_with_avx512_bf16(data):
    """The real entry point, on a CPU where bitsandbytes warns at import: still one line."""
    result = tapestry_process("join", "--data", data, "--initial-peers", "127.0.0.1:31330", prelude=AVX512_BF16)
    assert_user_error(result, "not a valid multiaddr")


def test_only_the_known_dependency_warning_is_filtered(caplog):
    hivemind_compat.install("main")
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        bnb.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_multiaddr_without_peer_id(data):
    result = tapestry("join", "--data", data, "--initial-peers", "/ip4/127.0.0.1/tcp/31330")
    assert_user_error(result, "no /p2p/", "copy the full address")


@pytest.mark.e2e
def test_initial_peers_that_do_not_answer(data, tmp_path, free_port):
    peer_id = load_or_create_identity(tmp_path / "someone.key").to_base58()
    started = time.monotonic()
    result = tapestry_process(
        "join",
        "--data",
        data,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--initial-peers",
        f"/ip4/127.0.0.1/tcp/{free_port}/p2p/{peer_id}",
    )
    assert_user_error(result, "none of the initial peers answered")
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("kind", ["missing", "empty-folder", "empty-file", "not-utf8", "bad-jsonl"])
def test_unusable_data(tmp_path, kind):
    path = tmp_path / "data"
    expected = {
        "missing": "does not exist",
        "empty-folder": "no .txt, .jsonl or .parquet files",
        "empty-file": "holds fewer than 1040 tokens",
        "not-utf8": "not UTF-8",
        "bad-jsonl": 'no string "text" field',
    }[kind]
    if kind == "empty-folder":
        path.mkdir()
    elif kind == "empty-file":
        path = tmp_path / "empty.txt"
        path.write_text("")
    elif kind == "not-utf8":
        path = tmp_path / "latin1.txt"
        path.write_bytes("café crème ".encode("latin-1") * 100)
    elif kind == "bad-jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    assert_user_error(tapestry("join", "--data", str(path), "--listen", "/ip4/127.0.0.1/tcp/0"), expected)


@pytest.mark.parametrize("command", ["join", "bootstrap"])
def test_port_already_in_use(data, tmp_path, command):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        extra = ["--data", data] if command == "join" else ["--identity", str(tmp_path / "b.key")]
        result = tapestry(command, "--listen", f"/ip4/127.0.0.1/tcp/{port}", *extra)
    assert_user_error(result, f"port {port} is already in use", "--listen")


@pytest.mark.parametrize(
    "option,value",
    [("--inner-steps", "0"), ("--max-rounds", "-3"), ("--batch-size", "0"), ("--lr", "-1"), ("--inner-steps", "many")],
)
def test_non_positive_numbers(data, option, value):
    assert_user_error(tapestry("join", "--data", data, option, value), option, "positive")


def test_config_file_unknown_key_and_wrong_type(data, tmp_path):
    config = tmp_path / "partner.toml"
    config.write_text('data = "x"\nbatch_sise = 4\n')
    assert_user_error(tapestry("join", "--config", str(config)), "unknown key 'batch_sise'")
    config.write_text('inner_steps = "ten"\n')
    assert_user_error(tapestry("join", "--config", str(config), "--data", data), "inner_steps", "positive integer")
    config.write_text("quiet = 1\n")
    assert_user_error(tapestry("join", "--config", str(config), "--data", data), "quiet", "true or false")
    config.write_text("outer_momentum = 1.5\n")
    assert_user_error(tapestry("join", "--config", str(config), "--data", data), "momentum", "[0, 1)")


def test_monitor_needs_initial_peers():
    assert_user_error(tapestry("monitor", "--run-id", "x"), "--initial-peers")


@pytest.mark.parametrize("problem", ["readable-by-others", "corrupt"])
def test_bad_identity_file(data, tmp_path, problem):
    identity = tmp_path / "id.key"
    load_or_create_identity(identity)
    if problem == "readable-by-others":
        identity.chmod(0o644)
        expected = "readable by others"
    else:
        identity.write_bytes(b"not a key")
        identity.chmod(0o600)
        expected = "is corrupt"
    before = identity.read_bytes()
    result = tapestry("join", "--data", data, "--listen", "/ip4/127.0.0.1/tcp/0", "--identity", str(identity))
    assert_user_error(result, expected, str(identity))
    assert identity.read_bytes() == before
