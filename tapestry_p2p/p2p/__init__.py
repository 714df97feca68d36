"""Below everything: DHT processes, addresses, process hygiene, and the one module that touches hivemind internals."""
