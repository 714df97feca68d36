"""Support for tests, the demo and scripts: a local swarm of real processes, and fault injection."""
