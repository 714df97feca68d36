"""Starting and stopping hivemind DHT nodes, each in a child process (with its own p2pd) that dies with us.

`start_dht` translates hivemind's start-up failures (tracebacks from a child process) into one `SwarmError` line that
names the fix. Addresses and identities are validated by the caller (`addresses`, `security.identity`) before this.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemind.dht import DHT
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils import get_dht_time

from tapestry_p2p.p2p import hivemind_compat
from tapestry_p2p.p2p.addresses import DEFAULT_PEER_LISTEN, SwarmError, check_ports_free

logger = logging.getLogger(__name__)

__all__ = ["DHT", "DHTOptions", "dht_time", "start_dht", "stop_dht", "visible_maddrs"]

STARTUP_TIMEOUT = 30.0  # seconds to wait for the DHT (and the initial peers' answers) before giving up


def dht_time() -> float:
    """The swarm's clock (hivemind's DHT time, unix seconds): meeting times and record times are in it."""
    return float(get_dht_time())


class _TiedDHT(DHT):
    """A hivemind DHT whose process and p2pd die with the process that started it."""

    def run(self) -> None:
        hivemind_compat.install("dht")
        hivemind_compat.tolerate_departed_senders(self)
        super().run()


@dataclass
class DHTOptions:
    """How to start one DHT node. Multiaddrs are already validated strings."""

    initial_peers: list[str] = field(default_factory=list)
    listen: list[str] = field(default_factory=lambda: list(DEFAULT_PEER_LISTEN))
    announce: list[str] = field(default_factory=list)
    identity: Path | None = None  # an existing identity file (see security.identity)
    client_mode: bool = False
    record_validators: list[Any] = field(default_factory=list)  # hivemind RecordValidatorBase instances
    authorizer: Any = None  # a hivemind AuthorizerBase for every DHT request and response (None: open)


def start_dht(options: DHTOptions) -> DHT:
    """Start a DHT node in a child process (with its own p2pd); translate hivemind's failures into SwarmError."""
    if not options.client_mode:
        check_ports_free(options.listen)
    kwargs: dict[str, Any] = dict(
        initial_peers=options.initial_peers or None,
        host_maddrs=options.listen,
        announce_maddrs=options.announce or None,
        client_mode=options.client_mode,
        startup_timeout=STARTUP_TIMEOUT,
        # No UPnP/NAT-PMP: it multicasts on every interface of the machine. Partners behind NAT forward a port
        # and pass --announce instead, which also makes the address they are reached at explicit.
        nat_port_map=False,
        # No circuit relay service and no AutoNAT: a node would otherwise relay strangers' traffic (N3 in the
        # security review); partners behind NAT forward a port and pass --announce.
        use_relay=False,
        use_auto_relay=False,
        auto_nat=False,
        record_validators=options.record_validators,
        authorizer=options.authorizer,
        start=False,
    )
    if options.identity is not None:
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


def visible_maddrs(dht: DHT, attempts: int = 3, timeout: float = 10.0) -> list[str]:
    """This node's dialable addresses, each ending in /p2p/<peer id>; asks again if the DHT process does not answer."""
    for _ in range(attempts):
        future = dht.run_coroutine(hivemind_compat.visible_maddrs_call(), return_future=True)
        try:
            return [str(m) for m in future.result(timeout=timeout)]
        except TimeoutError:
            future.cancel()
            logger.debug("the DHT process did not report our addresses within %.0fs; asking again", timeout)
    raise SwarmError(f"the DHT process did not report our addresses {attempts} times; restart the node")
