"""A node: the round loop, the swarm session (identity -> DHT -> status -> averager), state sync policy, metrics."""
