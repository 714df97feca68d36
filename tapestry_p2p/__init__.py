"""tapestry-p2p: a consortium trains one model together, peer to peer, with DiLoCo over hivemind's DHT."""

__version__ = "0.1.0"

BOOTSTRAP_PORT = 31330  # the documented default TCP port of `tapestry bootstrap`


class UserError(Exception):
    """A problem the user can fix. Its message is one line that names the fix; the CLI prints it and exits 2."""
