from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from clusternodes import RingingCarrier
from natscluster import NatsCluster, nats_server


@pytest.fixture(scope="module")
def engine_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three nats-server members with JetStream, routed into one cluster (per test module)."""
    if nats_server() is None:
        pytest.skip("Debian nats-server is needed (make system-deps)")
    with NatsCluster(tmp_path_factory.mktemp("nats")) as cluster:
        cluster.wait_ready()
        yield cluster


@pytest.fixture(scope="module")
def carrier() -> Iterator[RingingCarrier]:
    """A carrier on 127.0.0.2 that rings every call of every node (per test module)."""
    c = RingingCarrier()
    yield c
    c.close()
