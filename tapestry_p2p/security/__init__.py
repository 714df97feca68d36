"""Identities (the keys nodes sign with) and DHT record validation."""
