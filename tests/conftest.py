"""Shared fixtures: real processes on loopback (tapestry_p2p.testing.local_swarm), every one of them stopped after
the test. End-to-end tests (real processes or DHT nodes) are marked `e2e`: `pytest -m "not e2e"` runs the rest in
seconds."""

from __future__ import annotations

import pytest

from tapestry_p2p.testing.local_swarm import LocalSwarm


@pytest.fixture
def procs(tmp_path):
    with LocalSwarm(tmp_path) as swarm:
        yield swarm


@pytest.fixture
def bootstrap_addr(procs):
    """A real `tapestry bootstrap` on loopback; yields its full multiaddr."""
    return procs.start_bootstrap()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e/ is end to end."""
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)
