"""``--cluster`` for the benchmarks: a three-node RabbitMQ cluster of their own on this machine
(``tests/support/cluster.py``), started for the run and stopped after it; its nodes' URLs replace
``MERGETAG_AMQP_URL``."""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path


def start_cluster() -> str:
    """Start the cluster; returns the setting that names its nodes."""
    from tests.support.cluster import Cluster, available

    reason = available()
    if reason:
        raise SystemExit(f"--cluster: {reason}")
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="mergetag-bench-cluster-")), 3, int(os.environ.get("MERGETAG_CLUSTER_BASE_PORT", "5801")))
    cluster.start()
    atexit.register(cluster.stop)
    os.environ["MERGETAG_AMQP_URL"] = cluster.amqp_url
    return cluster.amqp_url
