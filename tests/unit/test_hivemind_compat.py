"""The seam to hivemind (p2p/hivemind_compat.py): every private name we rely on exists in the installed hivemind, and
an upgrade that changes any of them is one readable error at start-up."""

from __future__ import annotations

from typing import get_type_hints

import pytest

from tapestry_p2p.p2p import hivemind_compat
from tapestry_p2p.p2p.hivemind_compat import SURFACE, HivemindChanged, Name, check


def test_the_installed_hivemind_has_every_name_we_rely_on():
    assert check() == []
    assert len(SURFACE) >= 20


def test_a_changed_hivemind_is_reported_name_by_name():
    surface = (
        Name("hivemind.averaging.allreduce:AllReduceRunner", "_accumulate_parts_streaming"),
        Name("hivemind.averaging.allreduce:AllReduceRunner", "_renamed_in_a_later_version"),
        Name("hivemind.averaging.partition:TensorPartContainer", "_gone_too", instance=True),
        Name("hivemind.no_such_module:Thing", "attribute"),
    )
    assert check(surface, expected_version="9.9.9") == [
        f"hivemind {__import__('hivemind').__version__} is installed, tapestry is written against 9.9.9",
        "hivemind.averaging.allreduce:AllReduceRunner has no _renamed_in_a_later_version",
        "hivemind.averaging.partition:TensorPartContainer has no _gone_too",
        "hivemind.no_such_module:Thing has no attribute",
    ]


def test_install_refuses_to_start_on_a_changed_hivemind(monkeypatch):
    monkeypatch.setattr(hivemind_compat, "check", lambda: ["hivemind.x:Y has no z", "hivemind.a:B has no c"])
    with pytest.raises(HivemindChanged, match="hivemind.x:Y has no z; hivemind.a:B has no c: reinstall with"):
        hivemind_compat.install("main")


def test_a_subclass_of_our_averager_speaks_the_same_protocol():
    """hivemind names handlers after the servicer's class; ours are named after the protocol, so a test's faulty peer
    (a subclass) and an honest peer reach each other's handlers."""
    from tapestry_p2p.comm.averager import ExactAverager

    class Faulty(ExactAverager):
        pass

    for method in ("rpc_agree", "rpc_aggregate_part", "rpc_state_slice"):
        assert Faulty._get_handle_name("run_avg", method) == ExactAverager._get_handle_name("run_avg", method)
    assert ExactAverager._get_handle_name("run_avg", "rpc_agree") == "run_avg::ExactAverager.rpc_agree"


def test_our_rpc_handlers_are_streams_to_hiveminds_servicer():
    """hivemind reads `rpc_*` type hints to decide which handlers stream; a wrong AsyncIterator makes them fail."""
    from hivemind.p2p.servicer import ServicerBase

    from tapestry_p2p.comm.allreduce import ExactAllReduceRunner
    from tapestry_p2p.comm.averager import ExactAverager

    for handler in (
        ExactAverager.rpc_state_slice,
        ExactAverager.rpc_join_group,
        ExactAverager.rpc_aggregate_part,
        ExactAverager.rpc_download_state,
        ExactAllReduceRunner.rpc_aggregate_part,
    ):
        hints = get_type_hints(handler)
        assert ServicerBase._strip_iterator_hint(hints["return"])[1], handler.__qualname__
    assert ServicerBase._strip_iterator_hint(get_type_hints(ExactAllReduceRunner.rpc_aggregate_part)["stream"])[1]


def test_a_stream_message_over_the_cap_is_refused_before_its_body_is_read():
    import asyncio

    from hivemind.p2p import P2P

    from tapestry_p2p.comm.averaging import PART_SIZE_BYTES

    assert 4 * PART_SIZE_BYTES < hivemind_compat.MAX_STREAM_MESSAGE  # a part and a state chunk fit, with framing
    hivemind_compat.cap_stream_messages()

    async def read(length: int, body: bytes) -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(length.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body)
        reader.feed_eof()
        return await P2P.receive_raw_data(reader)

    assert asyncio.run(read(3, b"abc")) == b"abc"
    with pytest.raises(hivemind_compat.MessageTooLarge, match="1099511627776-byte message"):
        asyncio.run(read(1 << 40, b"only the header was sent"))


def _sender_gone() -> None:
    raise EOFError  # what unpickling an MPFuture's pipe raises once its sender process has exited


class _FromAnExitedProcess:
    def __reduce__(self):
        return (_sender_gone, ())


def test_a_request_from_an_exited_process_does_not_kill_the_dht_process():
    import multiprocessing

    class FakeDHT:  # only the pipe end matters here
        def __init__(self, pipe):
            self._inner_pipe = pipe

    inner, outer = multiprocessing.Pipe()
    dht = FakeDHT(inner)
    hivemind_compat.tolerate_departed_senders(dht)
    outer.send(("store", [], {}))
    assert dht._inner_pipe.recv() == ("store", [], {})
    outer.send(("get", [_FromAnExitedProcess()], {}))
    with pytest.raises(ConnectionError):  # hivemind's request loop logs and skips a ConnectionError
        dht._inner_pipe.recv()
    assert dht._inner_pipe.poll() is False
    outer.close()
    with pytest.raises(EOFError):  # the pipe itself closed: as before
        dht._inner_pipe.recv()


def test_our_codec_imports_bitsandbytes_without_torch_compile_and_leaves_torch_compile_as_it_was():
    """bitsandbytes' import would otherwise import dynamo and inductor (seconds of every node's start); the 8-bit
    kernels it gives us still run, and torch.compile is torch's own again afterwards."""
    import subprocess
    import sys

    probe = (
        "import sys, torch; compile_before = torch.compile\n"
        "from hivemind.compression import CompressionInfo\n"
        "from tapestry_p2p.comm import codec\n"
        "print(torch.compile is compile_before, 'torch._dynamo' in sys.modules)\n"
        "x = torch.linspace(-1, 1, 4096)\n"
        "eight = codec.compression_for('8bit')\n"
        "y = eight.extract(eight.compress(x, CompressionInfo.from_tensor(x)))\n"
        "print(float((x - y).abs().max()))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    compile_restored, dynamo_imported, error = out.stdout.split()
    assert compile_restored == "True" and dynamo_imported == "False"
    assert float(error) < 0.02
