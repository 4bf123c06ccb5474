"""A whole pipeline of its own, as deployed, for the storm: a SecantusDB on a storage directory (so it
can be restarted on the same port with its data), the three ESP sandboxes, a receiver, an events
worker and the sync — every broker connection through a :class:`~tests.support.proxy.DroppingProxy`
— and the controls that break each of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from pymongo import AsyncMongoClient

from adapters.esps.mailchimp import DEFAULT_FIELDS
from broker import admin
from sandboxes.local import free_port, start_secantus, wait_for_port
from tests.conftest import (
    AMQP_URL,
    ESP_KEYS,
    IDENTITY_HASH_KEY,
    KLAVIYO_KEY,
    SENDGRID_API_KEY,
    SENDGRID_CUSTOM_FIELDS,
    SENDGRID_LIST_ID,
    SHOPIFY_SECRET,
    EspSandbox,
    esp_targets,
    spawn,
    start_mailchimp,
    start_sandbox,
    stop,
    stop_sandbox,
)
from tests.support.proxy import DroppingProxy

TARGETS = ["mailchimp", "klaviyo", "sendgrid"]
FAST = {
    # The system test's cadence, for a small burst. Retries absorb the storm: a message may meet the
    # broker down, the store restarting and an ESP's faults in turn; backoffs stay short so the drain
    # after the storm is not a wait. (At a thousand customers, a 3 s sweep lease re-claims every pending
    # profile that often: SecantusDB's scans of those claims then starve the merge. The benchmark runs
    # the defaults.)
    "MERGETAG_RETRY_MAX": "40",
    "MERGETAG_RETRY_MIN_BACKOFF_MS": "200",
    "MERGETAG_RETRY_MAX_BACKOFF_MS": "5000",
    "MERGETAG_RETRY_AFTER_S": "1",
    "MERGETAG_SYNC_GRACE_S": "1",
    "MERGETAG_SYNC_SWEEP_INTERVAL_S": "0.5",
    "MERGETAG_SYNC_LEASE_S": "3",
    "MERGETAG_ESP_CIRCUIT_OPEN_S": "2",
}


class Stack:
    """Parameters:
      root: a directory for the store's data, the ESP file and every process's log.
      amqp_url: the broker (a cluster's nodes, comma-separated), reached directly; default: the
        machine's RabbitMQ, through a proxy that can drop every connection (:meth:`cut_broker`).
      targets: changes to the ESP targets of the ESP file, per target.
      settings: ``MERGETAG_*`` variables for every process (default: the product's defaults).
    """

    def __init__(self, root: Path, amqp_url: str | None = None, targets: dict[str, dict[str, Any]] | None = None, **settings: str) -> None:
        self.target_changes = targets or {}
        self.root = root
        self.prefix = "storm" + uuid.uuid4().hex[:8]
        self.settings = {"MERGETAG_DEDUP_WINDOW_S": "3600", **settings}  # its delivery ids need not outlive it
        self.amqp_url = amqp_url or AMQP_URL
        self.proxy = None if amqp_url else DroppingProxy("127.0.0.1", int(AMQP_URL.rsplit(":", 1)[1].split("/")[0]))
        self.sandboxes: dict[str, EspSandbox] = {}
        self.workers: list[subprocess.Popen] = []
        self.others: list[subprocess.Popen] = []
        self.store: subprocess.Popen | None = None
        self.mongo_uri = ""
        self.store_port = free_port()
        self.receiver_url = ""
        self.env: dict[str, str] = {}
        self.db: Any = None
        self._client: AsyncMongoClient | None = None
        self._started = 0
        self.metrics_ports: dict[str, int] = {}
        """The Prometheus port of the latest worker and sync."""

    @property
    def api(self) -> str:
        """The Mailchimp sandbox's API root."""
        return f"{self.sandboxes['mailchimp'].url}/3.0"

    def start(self) -> None:
        """Every process; returns once the receiver listens and the workers consume (see :meth:`ready`)."""
        (self.root / "store").mkdir(parents=True, exist_ok=True)
        self._start_store()
        mailchimp = start_mailchimp()
        self.sandboxes = {
            "mailchimp": mailchimp,
            "klaviyo": start_sandbox("klaviyo", "--api-key", KLAVIYO_KEY, "--job-delay-ms", "200"),
            "sendgrid": start_sandbox("sendgrid", "--api-key", SENDGRID_API_KEY, "--job-delay-ms", "200", "--list-ids",
                                      SENDGRID_LIST_ID, "--custom-fields", SENDGRID_CUSTOM_FIELDS),
        }
        esp_file = self.root / "esps.json"
        changes = {**self.target_changes, "mailchimp": {"fields": DEFAULT_FIELDS, **self.target_changes.get("mailchimp", {})}}
        targets = esp_targets(mailchimp, self.sandboxes["klaviyo"], self.sandboxes["sendgrid"], **changes)
        esp_file.write_text(json.dumps(targets))
        if self.proxy is not None:
            self.proxy.start()
        self.env = {
            **os.environ, **ESP_KEYS, **self.settings,
            "MERGETAG_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{self.proxy.port}/%2F" if self.proxy else self.amqp_url,
            "MERGETAG_QUEUE_PREFIX": self.prefix,
            "MERGETAG_MONGODB_URI": self.mongo_uri,
            "MERGETAG_MONGODB_DATABASE": self.prefix,
            "MERGETAG_SHOPIFY_SECRETS": SHOPIFY_SECRET,
            "MERGETAG_ESP_FILE": str(esp_file),
            "MERGETAG_IDENTITY_HASH_KEYS": os.environ.get("MERGETAG_IDENTITY_HASH_KEYS", IDENTITY_HASH_KEY),
        }
        self.env.pop("MONGODB_URI", None)
        port = free_port()
        self.others.append(spawn(self.env, self.root / "receiver.log", "receiver", "--port", str(port)))
        self.receiver_url = f"http://127.0.0.1:{port}"
        self.start_worker()
        self.start_sync()
        wait_for_port(port, timeout=90, process=self.others[0])
        self._client = AsyncMongoClient(self.mongo_uri, tz_aware=True)
        self.db = self._client[self.prefix]

    def ready(self) -> bool:
        """Every queue of the prefix has its consumers (the events worker's and the sync's)."""
        counts = admin.consumer_counts(self.amqp_url, self.prefix)
        return bool(counts) and min(counts.values()) > 0

    def start_worker(self) -> subprocess.Popen:
        self._started += 1
        self.metrics_ports["worker"] = port = free_port()
        worker = spawn({**self.env, "MERGETAG_WORKER_METRICS_PORT": str(port)}, self.root / f"worker-{self._started}.log", "worker")
        self.workers.append(worker)
        return worker

    def start_sync(self) -> subprocess.Popen:
        self._started += 1
        self.metrics_ports["sync"] = port = free_port()
        sync = spawn({**self.env, "MERGETAG_SYNC_METRICS_PORT": str(port)}, self.root / f"sync-{self._started}.log", "sync")
        self.others.append(sync)
        return sync

    def kill_sync(self) -> None:
        """SIGKILL the sync in the middle of its work, and start another."""
        doomed = self.others.pop(1)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
        self.start_sync()

    def kill_worker(self) -> None:
        """SIGKILL the events worker in the middle of its work, and start another."""
        doomed = self.workers.pop(0)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
        self.start_worker()

    def restart_store(self, down_s: float = 1.0) -> None:
        """Stop SecantusDB as an operator would (SIGTERM), leave it down ``down_s``, start it again on the
        same port and storage directory."""
        assert self.store is not None
        self.store.terminate()
        try:
            self.store.wait(timeout=60)
        except subprocess.TimeoutExpired:  # stuck in a long operation: a restart is a restart
            self.store.kill()
            self.store.wait(timeout=30)
        time.sleep(down_s)
        self._start_store()

    def _start_store(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.store, self.mongo_uri = start_secantus(str(self.root / "store"), self.root / "secantus.log", port=self.store_port,
                                                            timeout=60)
                return
            except RuntimeError:  # the port is not free yet after the last process: try again
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def cut_broker(self, down_s: float) -> int:
        """Every broker connection of the pipeline dropped, new ones refused for ``down_s``."""
        assert self.proxy is not None, "a stack on a cluster has no proxy: stop a node instead"
        return self.proxy.cut(down_s)

    async def control(self, http: aiohttp.ClientSession, esp: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return await self.sandboxes[esp].control(http, path, body)

    def dead_letters(self) -> dict[str, int]:
        depths = admin.queue_depths(self.amqp_url, self.prefix)
        return {q: n for q, n in depths.items() if q.endswith(".XQ") and n}

    async def close(self) -> None:
        stop(self.workers + self.others)
        if self._client is not None:
            await self._client.close()
        if self.proxy is not None:
            self.proxy.close()
        for sandbox in self.sandboxes.values():
            stop_sandbox(sandbox)
        if self.store is not None:
            self.store.terminate()
            try:
                self.store.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.store.kill()
        await asyncio.to_thread(admin.drop_queues, self.amqp_url, self.prefix)
