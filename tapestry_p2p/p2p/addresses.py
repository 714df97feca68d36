"""Addresses: multiaddr validation and free-port checks, before hivemind sees any of it.

hivemind's own failures on a bad address are tracebacks from a child process, so every check here raises
`SwarmError` with one line that names the fix; the CLI prints it and exits 2. Multiaddrs are validated with
py-multiaddr and handed on as strings (hivemind vendors its own Multiaddr class).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

import multiaddr
import multiaddr.exceptions

from tapestry_p2p.errors import UserError

BOOTSTRAP_PORT = 31330  # the documented default TCP port of `tapestry bootstrap`
DEFAULT_PEER_LISTEN = ("/ip4/0.0.0.0/tcp/0",)
DEFAULT_BOOTSTRAP_LISTEN = (f"/ip4/0.0.0.0/tcp/{BOOTSTRAP_PORT}",)


class SwarmError(UserError):
    """A problem with addresses or the DHT the user can fix; its message is one line that says how."""


def parse_maddrs(values: Sequence[str], *, option: str, need_peer_id: bool) -> list[str]:
    """Validate multiaddrs with py-multiaddr; return them as strings (hivemind vendors its own Multiaddr class)."""
    result = []
    for value in values:
        try:
            maddr = multiaddr.Multiaddr(value)
        except (multiaddr.exceptions.Error, ValueError, TypeError) as e:
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


def _host_of(maddr: multiaddr.Multiaddr, protocols: list[str]) -> tuple[socket.AddressFamily, str | None]:
    if "ip4" in protocols:
        return socket.AF_INET, maddr.value_for_protocol("ip4")
    if "ip6" in protocols:
        return socket.AF_INET6, maddr.value_for_protocol("ip6")
    return socket.AF_INET, None
