"""``make run-local`` (``python -m sandboxes.local``): the whole system on this machine, without Docker.

Uses the local RabbitMQ and Redis, starts a SecantusDB (MongoDB wire protocol)
unless ``MONGODB_URI``/``MERGETAG_MONGODB_URI`` is set, every ESP sandbox (the sync keeps
each of them up to date, with the sandbox's own key), the receiver, the admin API (token
``dev-admin-token``), the send-time feed (token ``dev-feed-token``), the workers and the sync, each as its own process. Ctrl-C stops all.
Test equipment like the sandboxes it starts: never part of the product.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEV_SECRET = "dev-shopify-secret"
SOURCE_TREE = Path(__file__).resolve().parents[1]
DEV_IDENTITY_KEY = "dev-identity-hash-key-change-me"
DEV_ADMIN_TOKEN = "dev-admin-token"
DEV_FEED_TOKEN = "dev-feed-token"
# Each sandbox's own key, port offset from MERGETAG_SANDBOX_PORT, and API path.
SANDBOXES = {
    "mailchimp": ("sandbox0000000000000000000000000-us1", 0, "/3.0"),
    "klaviyo": ("pk_sandbox0000000000000000000000000000", 3, ""),
    "sendgrid": ("SG.sandbox.0000000000000000000000", 4, ""),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def start_secantus(storage: str = ":memory:", log: Path | None = None, port: int | None = None,
                   timeout: float = 20.0) -> tuple[subprocess.Popen, str]:
    """Start SecantusDB; returns the process and its MongoDB URI.

    Parameters:
      storage: a directory (reopened intact when started again on it) or ``:memory:``.
      log: where its own log goes (it warns there about writes that keep conflicting, for one).
      port: default a free one; a restart passes the port it had, so its clients find it again.
      timeout: how long it may take to listen (reopening a large directory takes a while).
    """
    port = port or free_port()
    binary = Path(sys.executable).with_name("secantusd-py")
    output = log.open("ab") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(
        [str(binary), "--host", "127.0.0.1", "--port", str(port), "--storage-path", storage],
        stdout=output,
        stderr=output,
    )
    wait_for_port(port, timeout=timeout, process=process)
    return process, f"mongodb://127.0.0.1:{port}/?directConnection=true"


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_local(receiver_port: int) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    env = dict(os.environ)
    processes: list[subprocess.Popen] = []
    if not (env.get("MONGODB_URI") or env.get("MERGETAG_MONGODB_URI")):
        storage = tempfile.mkdtemp(prefix="mergetag-secantus-")
        mongo, uri = start_secantus(storage)
        processes.append(mongo)
        env["MERGETAG_MONGODB_URI"] = uri
    sandbox_port = int(env.get("MERGETAG_SANDBOX_PORT", "8081"))
    env.setdefault("MERGETAG_SHOPIFY_SECRETS", DEV_SECRET)
    env.setdefault("MERGETAG_TRACKING_WRITE_KEYS", "dev-write-key")
    env.setdefault("MERGETAG_IDENTITY_HASH_KEYS", DEV_IDENTITY_KEY)
    if "MERGETAG_GEOIP_DATABASE" not in env:
        from adapters.geoip import build_test_database

        env["MERGETAG_GEOIP_DATABASE"] = str(build_test_database(Path(tempfile.mkdtemp(prefix="mergetag-geo-")) / "test-city.mmdb"))
    ports = {esp: sandbox_port + offset for esp, (_, offset, _) in SANDBOXES.items()}
    for esp, (key, offset, path) in SANDBOXES.items():
        env.setdefault(f"MERGETAG_{esp.upper()}_BASE_URL", f"http://127.0.0.1:{sandbox_port + offset}{path}")
        env.setdefault(f"MERGETAG_{esp.upper()}_API_KEY", key)
    env.setdefault("MERGETAG_MAILCHIMP_LIST_ID", "sandbox")
    env.setdefault("MERGETAG_ESPS", ",".join(SANDBOXES))
    env.setdefault("MERGETAG_ADMIN_TOKEN", DEV_ADMIN_TOKEN)
    env.setdefault("MERGETAG_FEED_TOKENS", json.dumps({"dev": {"token": DEV_FEED_TOKEN, "targets": list(SANDBOXES)}}))
    env.setdefault("MERGETAG_SYNC_GRACE_S", "5")
    mergetag = [sys.executable, "-m", "adapters.cli"]
    for esp, port in ports.items():
        # The sandboxes are test equipment beside the product, not in it: run from the source tree.
        sandbox = subprocess.Popen([sys.executable, "-m", f"sandboxes.{esp}", "--port", str(port)], env=env, cwd=SOURCE_TREE)
        processes.append(sandbox)
        wait_for_port(port, process=sandbox)
    admin_port = int(env.get("MERGETAG_ADMIN_PORT", "8083"))
    feed_port = int(env.get("MERGETAG_FEED_PORT", "8086"))
    for command in (["worker"], ["sync"], ["feed", "--port", str(feed_port)], ["admin", "--port", str(admin_port)],
                    ["receiver", "--port", str(receiver_port)]):
        processes.append(subprocess.Popen([*mergetag, *command], env=env))
    wait_for_port(admin_port, process=processes[-2])
    wait_for_port(receiver_port, process=processes[-1])
    print(
        f"mergetag is running: receiver http://127.0.0.1:{receiver_port}, admin API http://127.0.0.1:{admin_port} "
        f"(token {env['MERGETAG_ADMIN_TOKEN']!r}), feed http://127.0.0.1:{feed_port}/feed/v1/<target>/<email> (token {DEV_FEED_TOKEN!r}), "
        "ESP sandboxes: "
        + ", ".join(f"{esp} {env[f'MERGETAG_{esp.upper()}_BASE_URL']}" for esp in ports)
        + f", MongoDB {env['MERGETAG_MONGODB_URI']}, "
        f"Shopify secret {env['MERGETAG_SHOPIFY_SECRETS'].split(',')[0]!r}. Ctrl-C stops.",
        flush=True,
    )
    try:
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(processes):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="run the whole system locally, without Docker")
    parser.add_argument("--port", type=int, default=8080, help="the receiver's port")
    raise SystemExit(run_local(parser.parse_args().port))
