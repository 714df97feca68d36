"""Downloading the shared state from peers: wire format, policy (which copy, who serves what), transport, client."""
