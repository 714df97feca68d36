"""Network namespaces for the benchmarks: N partners behind one switch, each on its own capped link.

Namespace `<tag>s` holds a bridge (the switch, address .254, where a bootstrap node lives); namespace `<tag>pI` holds
partner I at address .(I+1) on a veth to the bridge. Each link is capped with `tc tbf` in both directions (egress of
the partner's end: its upload; egress of the switch's end: its download). `netem` is not available on our machines,
so no delay is added; `--delay` is refused with that reason instead of being ignored.

Every address lives inside namespaces this module creates (10.78.0.0/24), which `delete` removes. Needs root.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

SUBNET = "10.78.0"
SWITCH_HOST = 254


def sh(*args: str) -> None:
    subprocess.run(args, check=True)


def netem_available() -> bool:
    probe = subprocess.run(["modprobe", "-n", "sch_netem"], capture_output=True, check=False)
    return probe.returncode == 0


@dataclass
class Lab:
    tag: str  # a short unique prefix (interface names are at most 15 characters)
    partners: int
    rate: str  # tc rate, e.g. "20mbit"

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

    def create(self) -> None:
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

    def _cap(self, ns: str, device: str) -> None:
        # the burst must exceed the MTU, or TCP stalls under tbf
        tbf = ["tbf", "rate", self.rate, "burst", "64kb", "latency", "400ms"]
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", device, "root", *tbf)

    def delete(self) -> None:
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
