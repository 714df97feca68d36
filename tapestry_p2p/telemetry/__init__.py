"""Status records: what every node tells the swarm about itself, and the peer table read from them."""
