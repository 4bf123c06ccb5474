"""A RabbitMQ cluster of its own on this machine, for the cluster tests: three nodes with their own
node names, ports, data directories and Erlang cookie, never touching the system's RabbitMQ.

    python -m tests.support.cluster start [--dir D] [--nodes 3] [--base-port 5701]   # prints the nodes' URLs as JSON
    python -m tests.support.cluster stop [--dir D]

Each node is ``mergetag-c<i>@<host>`` on AMQP port ``base + i`` (distribution port ``base + i + 20000``),
with its data under ``<dir>/<name>``; the second and third join the first. Started from the server's own
scripts (``/usr/lib/rabbitmq/bin``), as the user running the tests, with ``HOME`` in ``dir`` (the cookie).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(os.environ.get("MERGETAG_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
DEFAULT_DIR = Path(os.environ.get("MERGETAG_CLUSTER_DIR", "/tmp/mergetag-cluster"))


def available() -> str | None:
    """Why no cluster can be started here (None when one can)."""
    if not (BIN / "rabbitmq-server").exists():
        return f"no RabbitMQ server scripts in {BIN}"
    if shutil.which("erl") is None and not Path("/usr/lib/erlang/bin/erl").exists():
        return "no Erlang runtime"
    return None


@dataclass
class Node:
    index: int
    directory: Path
    base_port: int
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])

    @property
    def name(self) -> str:
        return f"mergetag-c{self.index}@{self.host}"

    @property
    def port(self) -> int:
        return self.base_port + self.index

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def home(self) -> Path:
        return self.directory.parent

    def env(self) -> dict[str, str]:
        base = self.directory
        return {
            **os.environ,
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 20000),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        }

    def ctl(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "rabbitmqctl"), "-n", self.name, *args], env=self.env(), capture_output=True,
                              text=True, timeout=timeout, check=check)

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.port}\n"
            "loopback_users = none\n"
            "cluster_partition_handling = pause_minority\n"
            "vm_memory_high_watermark.relative = 0.2\n"
            "disk_free_limit.absolute = 50MB\n"
        )
        (self.directory / "advanced.config").write_text("[].\n")
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq-env.conf").write_text("")

    def start(self) -> subprocess.Popen:
        """Start the node in the background; returns once it answers (its app running)."""
        log = open(self.directory / "server.out", "ab")
        process = subprocess.Popen([str(BIN / "rabbitmq-server")], env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        (self.directory / "server.pid").write_text(str(process.pid))
        self.wait_running()
        return process

    def wait_running(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run([str(BIN / "rabbitmqctl"), "-n", self.name, "await_startup", "--timeout", "10"],
                                  env=self.env(), capture_output=True, text=True, timeout=60)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {done.stderr.strip()[-500:]}")
            time.sleep(1)

    def stop(self) -> None:
        """Stop the node (its data stays: a later start brings the same node back)."""
        done = self.ctl("stop", timeout=120, check=False)
        pid_file = self.directory / "server.pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL if done.returncode else signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
            pid_file.unlink(missing_ok=True)


@dataclass
class Cluster:
    directory: Path = DEFAULT_DIR
    size: int = 3
    base_port: int = 5701
    nodes: list[Node] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = [Node(i, self.directory / f"node{i}", self.base_port) for i in range(1, self.size + 1)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def amqp_url(self) -> str:
        """The setting that names every node (``MERGETAG_AMQP_URL``)."""
        return ",".join(self.urls)

    def start(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        cookie = self.directory / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        for node in self.nodes:
            node.prepare()
            node.start()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        self.wait_clustered()

    def wait_clustered(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        want = {node.name for node in self.nodes}
        while True:
            done = self.nodes[0].ctl("cluster_status", "--formatter", "json", check=False)
            if done.returncode == 0 and set(json.loads(done.stdout).get("running_nodes", [])) == want:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not formed: {done.stdout[-500:]} {done.stderr[-500:]}")
            time.sleep(1)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if (node.directory / "server.pid").exists():
                node.stop()

    def node_of_leader(self, queue: str) -> Node:
        """The node that leads a quorum queue's Raft group."""
        for node in self.nodes:
            done = node.ctl("list_queues", "name", "leader", "--formatter", "json", check=False, timeout=60)
            if done.returncode == 0:
                for row in json.loads(done.stdout):
                    if row["name"] == queue:
                        return next(n for n in self.nodes if n.name == row["leader"])
        raise LookupError(f"no leader found for {queue}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--base-port", type=int, default=5701)
    args = parser.parse_args(argv)
    cluster = Cluster(args.dir, args.nodes, args.base_port)
    if args.action == "start":
        reason = available()
        if reason:
            print(reason, file=sys.stderr)
            return 1
        cluster.start()
        print(json.dumps({"nodes": [n.name for n in cluster.nodes], "urls": cluster.urls, "amqp_url": cluster.amqp_url}))
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
