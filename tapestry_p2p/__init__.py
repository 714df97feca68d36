"""tapestry-p2p: a consortium trains one model together, peer to peer, with DiLoCo over hivemind's DHT."""

__version__ = "0.1.0"
