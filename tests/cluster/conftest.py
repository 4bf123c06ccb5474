"""A three-node RabbitMQ cluster of the tests' own (``tests/support/cluster.py``), started once for
the cluster tests and stopped after them; the system RabbitMQ is never touched."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.support.cluster import Cluster, available


def _free_base() -> int:
    """A base port whose three AMQP ports and their distribution ports are all free."""
    for base in range(5700, 6400, 10):
        ports = [base + i + extra for i in (1, 2, 3) for extra in (0, 20000)]
        free = True
        for port in ports:
            with socket.socket() as probe:
                free = free and probe.connect_ex(("127.0.0.1", port)) != 0
        if free:
            return base
    raise RuntimeError("no free ports for a local cluster")


# Package scope: three Erlang nodes must not keep running (and eating a 2-core machine) through the rest of the suite.
@pytest.fixture(scope="package")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    reason = available()
    if reason:
        pytest.skip(f"no local RabbitMQ cluster can be started: {reason}")
    nodes = Cluster(tmp_path_factory.mktemp("rabbitmq-cluster"), 3, _free_base())
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()
