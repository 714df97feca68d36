"""tapestry-p2p: a consortium trains one model together, peer to peer, with DiLoCo over hivemind's DHT.

Layers (imports only go down; `make lint` checks it, see docs/ARCHITECTURE.md):
`app` -> `node` -> `training` | `comm` | `telemetry` -> `p2p` | `security`. `testing` helps tests, the demo and scripts.
"""

__version__ = "0.1.0"
