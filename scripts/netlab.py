"""Network namespaces for the benchmarks: N partners behind one switch, each on its own capped link, with latency.

Namespace `<tag>s` holds the switch's host (address .254, where a bootstrap node lives); namespace `<tag>pI` holds
partner I at address .(I+1). `netem` does not exist on our machines, so the switch is a process of ours (`relay`):
every namespace has a TAP device, opened by the relay before it is moved into its namespace, and the relay forwards
each Ethernet frame between TAPs (learning MAC addresses, flooding broadcasts) after the link's one-way delay
(`rtt / 2`), at most at the link's `rate` into each namespace (a paced queue of one bandwidth-delay product, with
drops beyond it, like a router's buffer). Each TAP's egress is capped with `tc tbf` too (a partner's upload). With
`rtt_ms = 0` the switch is a kernel bridge with veths, capped with tbf in both directions, as before.

Every address lives inside namespaces this module creates (10.78.0.0/24), which `delete` removes; the relay is a child
process, stopped by its pid. Needs root. Try it: `sudo .venv/bin/python scripts/netlab.py --rtt 150` prints the
measured round-trip time and TCP throughput between two partners.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import heapq
import multiprocessing
import os
import select
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from typing import Optional

SUBNET = "10.78.0"
SWITCH_HOST = 254
TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
BROADCAST = b"\xff" * 6
FRAME = 65536  # read buffer (frames are at most the MTU plus the Ethernet header)


def sh(*args: str) -> None:
    subprocess.run(args, check=True)


def rate_bits(rate: str) -> float:
    """Bits per second of a tc-style rate ("20mbit")."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for suffix, factor in units.items():
        if rate.endswith(suffix):
            return float(rate[: -len(suffix)]) * factor
    raise ValueError(f"rate {rate!r}: write it as tc does, e.g. 20mbit")


@dataclass
class Lab:
    tag: str  # a short unique prefix (interface names are at most 15 characters)
    partners: int
    rate: str  # tc rate, e.g. "20mbit"
    rtt_ms: float = 0.0  # round-trip time between any two hosts (0: a kernel bridge, no delay)
    _relay: Optional[multiprocessing.Process] = field(default=None, repr=False)

    @property
    def switch(self) -> str:
        return f"{self.tag}s"

    def namespace(self, i: int) -> str:
        return f"{self.tag}p{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    @property
    def switch_address(self) -> str:
        return f"{SUBNET}.{SWITCH_HOST}"

    def prefix(self, i: int | None) -> tuple[str, ...]:
        """The command prefix that runs a process inside partner i's namespace (None: the switch's)."""
        return ("ip", "netns", "exec", self.switch if i is None else self.namespace(i))

    def hosts(self) -> list[tuple[str, str, str]]:
        """(namespace, device, address) of every host: the switch's, then each partner's."""
        hosts = [(self.switch, f"{self.tag}s", self.switch_address)]
        return hosts + [(self.namespace(i), f"{self.tag}p{i}", self.address(i)) for i in range(self.partners)]

    def create(self) -> None:
        if self.rtt_ms > 0:
            self._create_relayed()
        else:
            self._create_bridged()

    def _create_bridged(self) -> None:
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "set", "lo", "up")
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "addr", "add", f"{self.switch_address}/24", "dev", "br0")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.partners):
            ns, inside, outside = self.namespace(i), f"{self.tag}p{i}", f"{self.tag}s{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
            sh("ip", "link", "set", inside, "netns", ns)
            sh("ip", "link", "set", outside, "netns", self.switch)
            sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", inside)
            sh("ip", "-n", ns, "link", "set", inside, "mtu", "1500", "up")
            sh("ip", "-n", self.switch, "link", "set", outside, "master", "br0")
            sh("ip", "-n", self.switch, "link", "set", outside, "mtu", "1500", "up")
            self._cap(ns, inside)
            self._cap(self.switch, outside)

    def _create_relayed(self) -> None:
        hosts = self.hosts()
        ready_read, ready_write = multiprocessing.Pipe(duplex=False)
        devices = [device for _, device, _ in hosts]
        self._relay = multiprocessing.Process(
            target=relay, args=(devices, self.rtt_ms / 2000, rate_bits(self.rate), ready_write), daemon=True
        )
        self._relay.start()
        if not ready_read.poll(30) or ready_read.recv() != "ready":
            raise RuntimeError("the relay did not open its TAP devices")
        for ns, device, address in hosts:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # a long-haul link's usual tuning: a connection idle between two rounds keeps its congestion window
            # (Linux otherwise restarts it from slow start, a few round trips of a 300 ms link at every round)
            sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0")
            sh("ip", "link", "set", device, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", device)
            sh("ip", "-n", ns, "link", "set", device, "mtu", "1500", "up")
            self._cap(ns, device)

    def _cap(self, ns: str, device: str) -> None:
        # the burst must exceed the MTU, or TCP stalls under tbf; the queue holds one bandwidth-delay product
        latency = max(400, int(2 * self.rtt_ms))
        tbf = ["tbf", "rate", self.rate, "burst", "64kb", "latency", f"{latency}ms"]
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", device, "root", *tbf)

    def delete(self) -> None:
        if self._relay is not None and self._relay.is_alive():
            os.kill(self._relay.pid, signal.SIGTERM)  # type: ignore[arg-type]
            self._relay.join(timeout=10)
        for ns in [self.switch] + [self.namespace(i) for i in range(self.partners)]:
            subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)

    def counters(self, i: int, directions: tuple[str, ...] = ("tx_bytes", "rx_bytes")) -> int:
        """Bytes through partner i's end of its link, by default both ways (everything it exchanged with anyone);
        `("tx_bytes",)`: what it sent."""
        total = 0
        for direction in directions:
            path = f"/sys/class/net/{self.tag}p{i}/statistics/{direction}"
            out = subprocess.run([*self.prefix(i), "cat", path], check=True, capture_output=True, text=True)
            total += int(out.stdout)
        return total


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def relay(devices: list[str], delay: float, rate: float, ready: object) -> None:
    """The switch: forward frames between TAP devices after `delay` seconds, at most `rate` bits/s into each."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    fds = [open_tap(name) for name in devices]
    ready.send("ready")  # type: ignore[attr-defined]
    port_of = {fd: i for i, fd in enumerate(fds)}
    where: dict[bytes, int] = {}  # MAC address -> port
    free_at = [0.0] * len(fds)  # when each port's link is free again (pacing into it)
    queued = [0] * len(fds)  # bytes waiting for each port
    limit = max(64 * 1024, rate / 8 * 2 * delay)  # one bandwidth-delay product per port (a router's buffer)
    due: list[tuple[float, int, int, bytes]] = []  # (time, order, port, frame)
    order = 0
    poller = select.epoll()
    for fd in fds:
        poller.register(fd, select.EPOLLIN)
    while True:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else 1.0
        for fd, _ in poller.poll(timeout):
            while True:
                try:
                    frame = os.read(fd, FRAME)
                except BlockingIOError:
                    break
                source, destination = frame[6:12], frame[0:6]
                where[source] = port_of[fd]
                targets = [where[destination]] if destination in where else range(len(fds))
                now = time.monotonic()
                for port in targets:
                    if port == port_of[fd] or queued[port] + len(frame) > limit:
                        continue  # (dropped: the link's buffer is full)
                    free_at[port] = max(free_at[port], now) + len(frame) * 8 / rate
                    queued[port] += len(frame)
                    order += 1
                    heapq.heappush(due, (free_at[port] + delay, order, port, frame))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, port, frame = heapq.heappop(due)
            queued[port] -= len(frame)
            with contextlib.suppress(OSError):  # (the device is down: the lab is being deleted)
                os.write(fds[port], frame)


def _measure(lab: Lab) -> None:
    """Round-trip time (TCP connect) and TCP throughput from partner 0 to partner 1, for a look at the lab."""
    server = subprocess.Popen(
        [*lab.prefix(1), "python3", "-c", _SINK.format(address=lab.address(1))], stdout=subprocess.PIPE, text=True
    )
    time.sleep(1.0)
    client = subprocess.run(
        [*lab.prefix(0), "python3", "-c", _SOURCE.format(address=lab.address(1))], capture_output=True, text=True
    )
    out, _ = server.communicate(timeout=60)
    print(client.stdout.strip() or client.stderr.strip())
    print(out.strip())


_SINK = """
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("{address}", 5201)); s.listen()
for _ in range(3):
    c, _ = s.accept(); n = 0; t = time.time()
    while (b := c.recv(1 << 16)):
        n += len(b)
    if n: print(f"TCP throughput {{n * 8 / (time.time() - t) / 1e6:.1f}} Mbit/s")
"""
_SOURCE = """
import socket, time
socket.create_connection(("{address}", 5201)).close()  # (the first one resolves the address: ARP, one more trip)
t = time.time(); c = socket.create_connection(("{address}", 5201)); rtt = time.time() - t; c.close()
print(f"TCP connect (one round trip) {{rtt * 1000:.0f}} ms")
c = socket.create_connection(("{address}", 5201)); end = time.time() + 8
while time.time() < end:
    c.sendall(bytes(1 << 16))
c.close()
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Create a lab, measure it, delete it.")
    parser.add_argument("--rtt", type=float, default=150.0, help="round-trip time in ms (0: kernel bridge)")
    parser.add_argument("--rate", default="20mbit")
    options = parser.parse_args()
    lab = Lab(f"t{os.getpid() % 10000}", 2, options.rate, options.rtt)
    try:
        lab.create()
        _measure(lab)
    finally:
        lab.delete()
