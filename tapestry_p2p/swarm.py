"""Joining the swarm: multiaddr validation, persistent identities, and starting hivemind DHT nodes.

Everything here checks user input *before* hivemind sees it, because hivemind's own failures are tracebacks from
a child process. Each check raises `SwarmError` with one line that names the fix; the CLI prints it and exits 2.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import multiaddr
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from tapestry_p2p import UserError
from tapestry_p2p.processes import die_with_parent, keep_tasks_alive, spawn_children_that_die_with_us

logger = logging.getLogger(__name__)

DEFAULT_PEER_LISTEN = ("/ip4/0.0.0.0/tcp/0",)
STARTUP_TIMEOUT = 30.0  # seconds to wait for the DHT (and the initial peers' answers) before giving up


class SwarmError(UserError):
    """A problem the user can fix; its message is one line that says how."""


def parse_maddrs(values: Sequence[str], *, option: str, need_peer_id: bool) -> List[str]:
    """Validate multiaddrs with py-multiaddr; return them as strings (hivemind vendors its own Multiaddr class)."""
    result = []
    for value in values:
        try:
            maddr = multiaddr.Multiaddr(value)
        except Exception as e:
            raise SwarmError(
                f"{option}: {value!r} is not a valid multiaddr ({e}); "
                "expected e.g. /ip4/203.0.113.5/tcp/31330/p2p/12D3Koo..."
            ) from None
        protocols = [p.name for p in maddr.protocols()]
        if need_peer_id and "p2p" not in protocols:
            raise SwarmError(
                f"{option}: {value} has no /p2p/<peer id>; copy the full address that `tapestry bootstrap` printed"
            )
        if not need_peer_id and "p2p" in protocols:
            raise SwarmError(f"{option}: {value} is a local address and must not contain /p2p/; remove that part")
        result.append(str(maddr))
    return result


def check_ports_free(listen: Sequence[str]) -> None:
    """Fail early, with the fix, if a fixed TCP port we are told to listen on is taken."""
    for value in listen:
        maddr = multiaddr.Multiaddr(value)
        protocols = [p.name for p in maddr.protocols()]
        if "tcp" not in protocols:
            continue
        port = int(maddr.value_for_protocol("tcp"))
        family, host = _host_of(maddr, protocols)
        if port == 0 or host is None:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise SwarmError(
                        f"port {port} is already in use: stop the process using it or pass --listen with another port"
                    ) from None
                raise SwarmError(
                    f"cannot listen on {value}: {e.strerror}; pass --listen with a local address"
                ) from None


def _host_of(maddr: multiaddr.Multiaddr, protocols: List[str]):
    if "ip4" in protocols:
        return socket.AF_INET, maddr.value_for_protocol("ip4")
    if "ip6" in protocols:
        return socket.AF_INET6, maddr.value_for_protocol("ip6")
    return socket.AF_INET, None


def load_or_create_identity(path: Path) -> PeerID:
    """Return the peer id stored at `path`, creating a new RSA identity there (mode 0600, atomically) if absent."""
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise SwarmError(f"identity file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
        try:
            return PeerID.from_identity(path.read_bytes())
        except Exception:
            raise SwarmError(
                f"identity file {path} is corrupt; restore it from a backup, or delete it to get a new peer id"
            ) from None
    if not path.parent.is_dir():
        raise SwarmError(f"--identity: folder {path.parent} does not exist; create it first")
    _write_new_identity(path)
    logger.info("created a new identity in %s", path)
    return PeerID.from_identity(path.read_bytes())


def _write_new_identity(path: Path) -> None:
    """A new RSA libp2p identity at `path`, mode 0600, written atomically."""
    key = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes())
    data = key.SerializeToString()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def ephemeral_identity() -> Iterator[Path]:
    """A fresh RSA identity in a private temporary folder, removed on exit (for nodes started without --identity).

    Every tapestry node has an RSA identity, because the same key signs its status records (see telemetry).
    """
    folder = Path(tempfile.mkdtemp(prefix="tapestry-id-"))
    try:
        path = folder / "identity.key"
        _write_new_identity(path)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _SenderGone(logging.Filter):
    """Drop hivemind's traceback for a command whose sending process exited while the command was in flight.

    The averager process talks to the DHT process through the DHT's pipe; when it shuts down with a request under
    way, the DHT process logs ConnectionResetError with a traceback and carries on. Nothing is lost but the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionError))


class _TiedDHT(DHT):
    """A hivemind DHT whose process and p2pd die with the process that started it."""

    def run(self) -> None:
        die_with_parent()
        keep_tasks_alive()
        spawn_children_that_die_with_us()
        logging.getLogger("hivemind.dht.dht").addFilter(_SenderGone())
        super().run()


@dataclass
class DHTOptions:
    """How to start one DHT node. Multiaddrs are already validated strings."""

    initial_peers: List[str] = field(default_factory=list)
    listen: List[str] = field(default_factory=lambda: list(DEFAULT_PEER_LISTEN))
    announce: List[str] = field(default_factory=list)
    identity: Optional[Path] = None
    client_mode: bool = False
    record_validators: list = field(default_factory=list)  # hivemind RecordValidatorBase instances


def start_dht(options: DHTOptions) -> DHT:
    """Start a DHT node in a child process (with its own p2pd); translate hivemind's failures into SwarmError."""
    if not options.client_mode:
        check_ports_free(options.listen)
    kwargs = dict(
        initial_peers=options.initial_peers or None,
        host_maddrs=options.listen,
        announce_maddrs=options.announce or None,
        client_mode=options.client_mode,
        startup_timeout=STARTUP_TIMEOUT,
        # No UPnP/NAT-PMP: it multicasts on every interface of the machine. Partners behind NAT forward a port
        # and pass --announce instead, which also makes the address they are reached at explicit.
        nat_port_map=False,
        record_validators=options.record_validators,
        start=False,
    )
    if options.identity is not None:
        load_or_create_identity(options.identity)
        kwargs["identity_path"] = str(options.identity)
    dht = _TiedDHT(**kwargs)
    started = time.monotonic()
    dht.start()
    try:
        dht.wait_until_ready(timeout=STARTUP_TIMEOUT + 5)
    except TimeoutError:
        stop_dht(dht)
        raise SwarmError(
            f"the DHT did not start within {STARTUP_TIMEOUT + 5:.0f}s; check that --initial-peers are reachable"
        ) from None
    except (P2PDaemonError, RuntimeError, OSError) as e:
        stop_dht(dht)
        raise SwarmError(_explain_start_failure(e, options)) from None
    logger.debug("DHT ready in %.1fs", time.monotonic() - started)
    return dht


def _explain_start_failure(error: Exception, options: DHTOptions) -> str:
    text = str(error)
    if "bootstrap" in text or "initial_peers" in text or "responded" in text:
        peers = " ".join(options.initial_peers)
        return f"none of the initial peers answered ({peers}); check the addresses and that those nodes are running"
    if "address already in use" in text:
        return "a port we were told to listen on is already in use: pass --listen with another port"
    if "already taken" in text:
        return "this identity is already in use by a running peer: stop that peer or use another --identity file"
    return f"could not start the DHT node: {text.splitlines()[0] if text else type(error).__name__}"


def stop_dht(dht: DHT) -> None:
    """Shut a DHT node down and wait for its process (p2pd dies with it)."""
    if dht.is_alive():
        dht.shutdown()
    dht.join(timeout=5)
    if dht.is_alive():
        dht.kill()


def visible_maddrs(dht: DHT, attempts: int = 3, timeout: float = 10.0) -> List[str]:
    """This node's dialable addresses, each ending in /p2p/<peer id>; asks again if the DHT process does not answer."""
    for _ in range(attempts):
        future = dht.run_coroutine(partial(DHT._get_visible_maddrs, latest=True), return_future=True)
        try:
            return [str(m) for m in future.result(timeout=timeout)]
        except TimeoutError:
            future.cancel()
            logger.debug("the DHT process did not report our addresses within %.0fs; asking again", timeout)
    raise SwarmError(f"the DHT process did not report our addresses {attempts} times; restart the node")
