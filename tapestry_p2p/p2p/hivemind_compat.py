"""The one seam to hivemind's internals: every global patch, log filter and private name we rely on, in one place.

tapestry subclasses hivemind's averager and all-reduce runner (`comm/averager.py`, `comm/allreduce.py`), which reach
into private attributes; this module owns everything else that depends on hivemind's internals, so an upgrade has one
list to read:

- `install(process)` applies the patches a process needs. It is called explicitly, never at import time: from the CLI
  (`"main"`), from the DHT process (`"dht"`, `p2p/dht.py`) and from the averager process (`"averager"`,
  `comm/averager.py`). Installing twice is harmless.
- `check()` compares the installed hivemind with what we were written against (`EXPECTED_VERSION` and `SURFACE`, every
  private name we use) and returns one readable line per difference; `install("main")` turns them into one error.
- small wrappers for the private names used outside the subclasses (`register_compression`, `visible_maddrs_call`,
  `rsa_key_from_der`, `owner_public_keys`).

The patches, and the hivemind 1.1.12 behaviour each one guards against:
- `keep_tasks_alive` (DHT and averager processes): hivemind's request loops start each request with
  `asyncio.create_task(...)` and keep no reference; asyncio keeps only weak ones, so the garbage collector can destroy
  a request in flight ("Task was destroyed but it is pending!") and its caller waits forever.
- `spawn_children_that_die_with_us` (DHT process): hivemind starts `p2pd` with asyncio; we add PR_SET_PDEATHSIG and a
  process group of its own, so p2pd dies with its DHT process and a terminal Ctrl-C reaches only the node.
- `cap_stream_messages` (DHT and averager processes): hivemind reads a stream message's 8-byte length and then
  that many bytes, whatever the length says, so one stream announcing 1 TB grows the receiver's memory until it dies
  (N1 in the security review); ours refuses any message over MAX_STREAM_MESSAGE before reading it.
- `tolerate_departed_senders` (DHT process): a request from another process carries an MPFuture whose pipe is
  unpickled by fetching it from the sender; if the sender exited in between (the averager at shutdown), unpickling
  raises EOFError, which hivemind's request loop does not catch, and the DHT process dies (then every later call of
  the node waits for ever). Ours turns that into the ConnectionError the loop already skips.
- `register_compression`: hivemind picks a codec by a fixed protobuf enum, so a codec of ours replaces the instance
  registered for an existing enum value (see `comm/codec.py`).
- `torch_compile_skipped` (wherever bitsandbytes is imported, `comm/codec.py`): bitsandbytes 0.50 wraps four pure-torch
  fallbacks of its default backend in `torch.compile` at import, which imports torch's dynamo and inductor: 1.4 s
  more for its import, 2.3 s of importing the node (4.8 s -> 2.5 s), in every node's, bootstrap's and monitor's
  start. The CPU kernels our codec calls are native, so the fallbacks stay plain functions.
- log filters, each dropping one known record and nothing else from its logger: bitsandbytes' import-time warning
  about its optional `kernels` package on CPUs with AVX512-BF16; the DHT process's traceback when a sender exits
  with a command in flight.

hivemind's leader/follower matchmaking is not used: groups are agreed (`comm.voting`), and `rpc_join_group` refuses
every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import re
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Literal

from tapestry_p2p.errors import UserError
from tapestry_p2p.p2p.processes import die_with_parent

logger = logging.getLogger(__name__)

EXPECTED_VERSION = "1.1.12"
# The largest message tapestry's p2p streams carry is one averaging part (comm.averaging.PART_SIZE_BYTES, 64 KiB of
# float32) or one state chunk (hivemind's split_for_streaming, 64 KiB), plus protobuf framing; 1 MiB leaves room.
MAX_STREAM_MESSAGE = 1 << 20
Process = Literal["main", "dht", "averager"]


class HivemindChanged(UserError):
    """The installed hivemind is not the one tapestry's overrides were written against."""


@dataclass(frozen=True)
class Name:
    """One private name we rely on: `attribute` of `owner` (module:qualname, or a dict). `instance` names exist only
    on instances, so they are looked up as `self.<attribute>` in the owner's source."""

    owner: str
    attribute: str
    instance: bool = False


SURFACE: tuple[Name, ...] = (
    Name("hivemind.p2p.servicer:ServicerBase", "_get_handle_name"),
    Name("hivemind.averaging.averager:DecentralizedAverager", "_get_current_state_from_host_process"),
    Name("hivemind.averaging.averager:DecentralizedAverager", "get_current_state"),
    Name("hivemind.averaging.averager:DecentralizedAverager", "state_sharing_priority"),
    Name("hivemind.averaging.averager:DecentralizedAverager", "_declare_for_download_periodically"),
    Name("hivemind.averaging.averager:DecentralizedAverager", "_state_updated", instance=True),
    Name("hivemind.averaging.averager:DecentralizedAverager", "_matchmaking", instance=True),
    Name("hivemind.averaging.averager:DecentralizedAverager", "_allreduce_timeout", instance=True),
    Name("hivemind.averaging.averager:DecentralizedAverager", "_running_groups", instance=True),
    Name("hivemind.averaging.averager:DecentralizedAverager", "_p2p", instance=True),
    Name("hivemind.averaging.averager:DecentralizedAverager", "_outer_pipe", instance=True),
    Name("hivemind.averaging.allreduce:AllReduceRunner", "_get_peer_stub"),
    Name("hivemind.averaging.allreduce:AllReduceRunner", "_generate_input_for_peer"),
    Name("hivemind.averaging.allreduce:AllReduceRunner", "_communicate_with_peer"),
    Name("hivemind.averaging.allreduce:AllReduceRunner", "_accumulate_parts_streaming"),
    Name("hivemind.averaging.allreduce:AllReduceRunner", "_ban_sender"),
    Name("hivemind.averaging.allreduce:AllReduceRunner", "_p2p", instance=True),
    Name("hivemind.averaging.partition:TensorPartContainer", "register_failed_reducer"),
    Name("hivemind.averaging.partition:TensorPartContainer", "_input_parts_by_peer", instance=True),
    Name("hivemind.averaging.partition:TensorPartContainer", "return_deltas", instance=True),
    Name("hivemind.averaging.partition:TensorPartReducer", "sender_failed_after", instance=True),
    Name("hivemind.compression.serialization:_BASE_COMPRESSION_TYPES", "BLOCKWISE_8BIT"),
    Name("hivemind.dht.dht:DHT", "_get_visible_maddrs"),
    Name("hivemind.dht.dht:DHT", "_inner_pipe", instance=True),
    Name("hivemind.p2p.p2p_daemon:P2P", "receive_raw_data"),
    Name("hivemind.p2p.p2p_daemon:P2P", "HEADER_LEN"),
    Name("hivemind.dht.crypto:RSASignatureValidator", "_PUBLIC_KEY_RE"),
    Name("hivemind.utils.crypto:RSAPrivateKey", "__setstate__"),
)


def _resolve(path: str) -> Any:
    module, _, qualname = path.partition(":")
    target: Any = import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _has(owner: Any, name: Name) -> bool:
    if isinstance(owner, dict):
        return name.attribute in owner
    if name.instance:
        return re.search(rf"self\.{re.escape(name.attribute)}\b", inspect.getsource(owner)) is not None
    return hasattr(owner, name.attribute)


def check(surface: tuple[Name, ...] = SURFACE, expected_version: str = EXPECTED_VERSION) -> list[str]:
    """One line per difference between the installed hivemind and what tapestry relies on; empty if none."""
    import hivemind

    problems = []
    if hivemind.__version__ != expected_version:
        problems.append(f"hivemind {hivemind.__version__} is installed, tapestry is written against {expected_version}")
    for name in surface:
        try:
            found = _has(_resolve(name.owner), name)
        except (ImportError, AttributeError, OSError, TypeError):
            found = False
        if not found:
            problems.append(f"{name.owner} has no {name.attribute}")
    return problems


def install(process: Process) -> None:
    """Apply what this process needs (see the module docstring); call it first thing in each process."""
    _filter("bitsandbytes.backends.cpu.ops", _KernelsPackageMissing())
    if process == "main":
        os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")  # read when hivemind is first imported
        problems = check()
        if problems:
            raise HivemindChanged(
                "; ".join(problems) + ": reinstall with `pip install -c constraints.txt -e .` (see the README)"
            )
    elif process == "dht":
        die_with_parent()
        keep_tasks_alive()
        cap_stream_messages()
        spawn_children_that_die_with_us()
        _filter("hivemind.dht.dht", _SenderGone())
    elif process == "averager":
        die_with_parent()
        keep_tasks_alive()
        cap_stream_messages()


@contextlib.contextmanager
def torch_compile_skipped() -> Iterator[None]:
    """While the body runs (an import of bitsandbytes), `torch.compile(fn, ...)` returns `fn` itself."""
    import torch

    original = torch.compile
    torch.compile = _not_compiled  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = original


def _not_compiled(fn: Callable[..., Any], **_options: Any) -> Callable[..., Any]:
    return fn


# ---- log filters: each drops one known record ----


def _filter(logger_name: str, record_filter: logging.Filter) -> None:
    target = logging.getLogger(logger_name)
    if not any(type(f) is type(record_filter) for f in target.filters):
        target.addFilter(record_filter)


class _KernelsPackageMissing(logging.Filter):
    """bitsandbytes >= 0.49 on CPUs with AVX512-BF16 warns at import that its optional `kernels` package is absent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


class _SenderGone(logging.Filter):
    """The DHT process logs ConnectionResetError with a traceback when the averager process (which talks to it through
    the DHT's pipe) exits with a request in flight; the DHT carries on and nothing is lost but the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionError))


# ---- global patches ----

_running_tasks: set[asyncio.Task] = set()


def keep_tasks_alive() -> None:
    """In this process, hold a strong reference to every task made by `asyncio.create_task` until it is done."""
    original = asyncio.create_task
    if getattr(original, "_tapestry_patched", False):
        return

    @functools.wraps(original)
    def create_task(coro: Coroutine[Any, Any, Any], **kwargs: Any) -> asyncio.Task:
        task = original(coro, **kwargs)
        _running_tasks.add(task)
        task.add_done_callback(_running_tasks.discard)
        return task

    create_task._tapestry_patched = True  # type: ignore[attr-defined]
    asyncio.create_task = create_task  # type: ignore[assignment]


class MessageTooLarge(ConnectionError):
    """A peer announced a stream message larger than MAX_STREAM_MESSAGE; the stream is dropped unread."""


def cap_stream_messages(max_bytes: int = MAX_STREAM_MESSAGE) -> None:
    """In this process, refuse any p2p stream message longer than `max_bytes` before reading its body."""
    from hivemind.p2p.p2p_daemon import P2P

    if getattr(P2P.receive_raw_data, "_tapestry_patched", False):
        return

    async def receive_raw_data(reader: asyncio.StreamReader) -> bytes:
        header = await reader.readexactly(P2P.HEADER_LEN)
        length = int.from_bytes(header, P2P.BYTEORDER)
        if length > max_bytes:
            raise MessageTooLarge(f"a peer announced a {length}-byte message; the limit is {max_bytes}")
        return await reader.readexactly(length)

    receive_raw_data._tapestry_patched = True  # type: ignore[attr-defined]
    P2P.receive_raw_data = staticmethod(receive_raw_data)


def _detach_and_die_with_parent() -> None:
    os.setpgid(0, 0)
    die_with_parent()


def spawn_children_that_die_with_us() -> None:
    """In this process, make asyncio-spawned subprocesses (hivemind's p2pd) die when this process dies."""
    original = asyncio.subprocess.create_subprocess_exec
    if getattr(original, "_tapestry_patched", False):
        return

    @functools.wraps(original)
    async def create_subprocess_exec(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        kwargs.setdefault("preexec_fn", _detach_and_die_with_parent)
        return await original(*args, **kwargs)

    create_subprocess_exec._tapestry_patched = True  # type: ignore[attr-defined]
    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec


class _DepartedSenders:
    """The DHT process's end of its request pipe, where a request whose sender is gone is a ConnectionError."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def recv(self) -> Any:
        from multiprocessing.reduction import ForkingPickler

        data = self._pipe.recv_bytes()  # EOFError here: the pipe itself is closed, as before
        try:
            return ForkingPickler.loads(data)
        except EOFError as e:
            raise ConnectionError("a request came from a process that exited before it could be read") from e


def tolerate_departed_senders(dht: Any) -> None:
    """In the DHT process: skip requests whose sender exited, instead of dying (see the module docstring)."""
    if not isinstance(dht._inner_pipe, _DepartedSenders):
        dht._inner_pipe = _DepartedSenders(dht._inner_pipe)


# ---- private names used outside the subclasses ----


def register_compression(enum_name: str, codec: Any) -> Any:
    """Make hivemind (de)serialize parts of `enum_name` with `codec` in this process and the ones it forks later;
    returns the codec now registered."""
    from hivemind.compression import serialization

    serialization._BASE_COMPRESSION_TYPES[enum_name] = codec
    return codec


def visible_maddrs_call() -> Callable[..., Any]:
    """The DHT-process coroutine that lists our dialable addresses (for `DHT.run_coroutine`, which takes a timeout;
    the public `get_visible_maddrs` blocks without one)."""
    from hivemind.dht import DHT

    return functools.partial(DHT._get_visible_maddrs, latest=True)


def rsa_key_from_der(der: bytes) -> Any:
    """An RSAPrivateKey from DER bytes, through hivemind's own unpickling path."""
    from hivemind.utils.crypto import RSAPrivateKey

    private = RSAPrivateKey.__new__(RSAPrivateKey)
    private.__setstate__({"_private_key": der})
    return private


def owner_public_keys(owner: bytes) -> list[bytes]:
    """The `ssh-rsa` public keys inside a DHT subkey in hivemind's `[owner:...]` form."""
    from hivemind.dht.crypto import RSASignatureValidator

    return list(RSASignatureValidator._PUBLIC_KEY_RE.findall(owner))
