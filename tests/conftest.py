"""Real services for the tests: local RabbitMQ, a SecantusDB process (or ``MONGODB_URI``),
the Mailchimp sandbox process, a Sentry sink, and the mergetag worker processes."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pika
import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pymongo import AsyncMongoClient

from adapters.esps.mailchimp import DEFAULT_FIELDS as DEFAULT_MERGE_FIELDS
from adapters.esps.mailchimp.member import subscriber_hash
from adapters.geoip import build_test_database
from adapters.http.receiver import create_app
from adapters.settings import Settings
from adapters.sources.shopify import sign
from broker import admin
from sandboxes.local import free_port, start_secantus, wait_for_port
from schemas.profile import IdentityHasher

AMQP_URL = os.environ.get("MERGETAG_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
IDENTITY_HASH_KEY = "test-identity-hash-key-0123456789"
HASHER = IdentityHasher((IDENTITY_HASH_KEY.encode(),))


def index_key(key: str) -> str:
    """How the tests' processes index identity key ``key`` (``email:…``) in the profiles' ``keys``."""
    return HASHER.index_key(key)
API_KEY = "testkey00000000000000000000000000-us1"
SHOPIFY_SECRET = "test-shopify-secret"
ROOT = Path(__file__).resolve().parents[1]
# CITY is mapped but not defined on the sandbox audience: a profile with a city is refused (until fixed).
MERGE_FIELDS = {**DEFAULT_MERGE_FIELDS, "city": "CITY", "abandoned_cart_url": "CARTURL", "abandoned_cart_value": "CARTVAL"}
SANDBOX_FIELDS = "FNAME:text,LNAME:text,LTV:number,ORDERS:number,LASTORDER:date,TIER:text,CARTURL:text,CARTVAL:number"

KLAVIYO_KEY = "pk_test_0123456789abcdef0123456789ab"
SENDGRID_API_KEY = "SG.test.mergetag-0123456789"
SENDGRID_LIST_ID = "5f0a1c3e-8b7d-4e2a-9c61-0d3b2a4e5f67"
SENDGRID_CUSTOM_FIELDS = "ltv:Number,orders:Number,last_order:Date,tier:Text,cart_url:Text,cart_value:Number"
KLAVIYO_FIELDS = {"first_name": "first_name", "last_name": "last_name", "lifetime_value": "lifetime_value",
                  "order_count": "order_count", "loyalty_tier": "loyalty_tier", "city": "location.city", "abandoned_cart_url": "cart_url"}
SENDGRID_FIELDS = {"first_name": "first_name", "last_name": "last_name", "lifetime_value": {"tag": "ltv", "type": "number"},
                   "order_count": "orders", "last_order_date": "last_order", "loyalty_tier": "tier", "abandoned_cart_url": "cart_url",
                   "abandoned_cart_value": "cart_value"}
WRITE_KEY = "test-write-key"
MAILCHIMP_URL_SECRET = "mc-url-secret"
MANDRILL_KEY = "mandrill-webhook-key"
STANDARD_SECRET = "whsec_" + base64.b64encode(b"standard-webhooks-test-secret-32b").decode()
STRIPE_SECRET = "whsec_stripe_test_secret"
HMAC_SECRET = "legacy-crm-secret"
SENDGRID_KEY = ec.generate_private_key(ec.SECP256R1())
SENDGRID_PUBLIC = base64.b64encode(
    SENDGRID_KEY.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
).decode()
# Three senders configured, not coded: a CRM on Standard Webhooks, billing on Stripe signatures
# (with the Stripe preset mapping), and a legacy CRM signing with its own HMAC header.
SOURCES = {
    "crm": {
        "scheme": "standard-webhooks", "secrets_env": "TEST_CRM_SECRETS",
        "mapping": {"contact.updated": {
            "event": "customer.updated", "email": "data.email", "customer_id": "data.id",
            "event_time": "data.updated_at", "event_id": "data.revision",
            "traits": {"first_name": "data.first_name", "last_name": "data.last_name"}}},
    },
    # A CRM that sends no time of its own: its facts are stamped with their first arrival.
    "plaincrm": {
        "scheme": "standard-webhooks", "secrets_env": "TEST_CRM_SECRETS",
        "mapping": {"contact.updated": {"event": "customer.updated", "email": "data.email", "traits": {"first_name": "data.first_name"}}},
    },
    "billing": {"scheme": "stripe", "secrets": [STRIPE_SECRET], "preset": "stripe"},
    "legacy": {
        "scheme": "hmac", "secrets": ["old-legacy-secret", HMAC_SECRET], "signature_header": "X-Legacy-Signature",
        "algorithm": "sha256", "encoding": "base64", "prefix": "sha256=", "type_path": "kind", "id_path": "uid",
        "mapping": {"purchase": {
            "event": "order.completed", "email": "buyer.email", "event_time": "at",
            "fields": {"order_id": "uid", "total": {"path": "amount_cents", "divide": 100}, "currency": {"const": "EUR"}}}},
    },
}


def source_env() -> dict[str, str]:
    """Everything the receiver and the workers need to know about the senders."""
    return {
        "MERGETAG_SOURCES": json.dumps(SOURCES),
        "TEST_CRM_SECRETS": STANDARD_SECRET,
        "MERGETAG_TRACKING_WRITE_KEYS": WRITE_KEY,
        "MERGETAG_SENDGRID_WEBHOOK_PUBLIC_KEYS": SENDGRID_PUBLIC,
        "MERGETAG_MAILCHIMP_WEBHOOK_SECRETS": MAILCHIMP_URL_SECRET,
        "MERGETAG_MANDRILL_WEBHOOK_KEYS": MANDRILL_KEY,
    }


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 60.0, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail with its last value after ``timeout``.

    Deadlines are generous: they cost nothing when the machine is fast and keep a busy one honest.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")


def queue_counts(prefix: str) -> dict[str, int]:
    return admin.queue_depths(AMQP_URL, prefix)


def queue_backlog(prefix: str) -> dict[str, int]:
    """Messages of the prefix that are ready or being worked on (RabbitMQ's own count, unacked ones too),
    dead letters aside: empty once everything sent to the prefix was taken and acked."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "messages", "--formatter", "json"],
                         capture_output=True, text=True, timeout=60, check=True)
    return {q["name"]: q["messages"] for q in json.loads(out.stdout)
            if q["name"].startswith(prefix + ".") and not q["name"].endswith(".XQ") and q["messages"]}


def delete_queues(prefix: str) -> None:
    admin.drop_queues(AMQP_URL, prefix)


def signed(payload: dict[str, Any] | bytes, secret: str = SHOPIFY_SECRET) -> tuple[bytes, str]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return body, sign(body, secret)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def post_webhook(
    session: aiohttp.ClientSession, base_url: str, topic: str, payload: dict[str, Any] | bytes,
    *, secret: str = SHOPIFY_SECRET, webhook_id: str | None = None, source: str = "shopify",
) -> Reply:
    body, signature = signed(payload, secret)
    headers = {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Hmac-Sha256": signature,
        "X-Shopify-Webhook-Id": webhook_id or str(uuid.uuid4()),
        "X-Shopify-Shop-Domain": "test.myshopify.com",
    }
    async with session.post(f"{base_url}/webhooks/{source}", data=body, headers=headers) as response:
        return Reply(response.status, dict(response.headers), await response.read())


async def deliver_webhook(session: aiohttp.ClientSession, base_url: str, topic: str, payload: dict[str, Any] | bytes,
                          *, deadline_s: float = 120.0, **options: Any) -> Reply:
    """:func:`post_webhook` as a sender does it: a 503 (no confirm from a busy broker) is retried after a
    short pause, until ``deadline_s``; returns the last answer."""
    deadline = time.monotonic() + deadline_s
    while True:
        reply = await post_webhook(session, base_url, topic, payload, **options)
        if reply.status != 503 or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.5)


def pytest_configure(config: pytest.Config) -> None:
    """Every process the tests start hashes identifiers with the tests' own key."""
    os.environ.setdefault("MERGETAG_IDENTITY_HASH_KEYS", IDENTITY_HASH_KEY)


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    connection.close()
    return AMQP_URL


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory) -> Iterator[str]:
    """``MONGODB_URI`` when set (a real replica set); otherwise a SecantusDB process of our own, its log
    in the session's temporary directory."""
    uri = os.environ.get("MONGODB_URI")
    if uri:
        yield uri
        return
    process, uri = start_secantus(log=tmp_path_factory.mktemp("secantus") / "secantus.log")
    yield uri
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # busy in a long operation: it must not outlive the session
        process.kill()
        process.wait(timeout=10)


@dataclass
class EspSandbox:
    """An ESP sandbox process and its ``/_sandbox`` controls."""

    url: str
    process: subprocess.Popen

    async def control(self, session: aiohttp.ClientSession, path: str, body: dict[str, Any] | None = None) -> Any:
        method = session.post if body is not None else session.get
        async with method(f"{self.url}/_sandbox/{path}", json=body) as r:
            return await r.json()


def start_sandbox(module: str, *flags: str) -> EspSandbox:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", f"sandboxes.{module}", "--port", str(port), *flags],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process=process)
    return EspSandbox(f"http://127.0.0.1:{port}", process)


def stop_sandbox(sandbox: EspSandbox) -> None:
    sandbox.process.terminate()
    sandbox.process.wait(timeout=10)


@pytest.fixture(scope="session")
def klaviyo_sandbox() -> Iterator[EspSandbox]:
    sandbox = start_sandbox("klaviyo", "--api-key", KLAVIYO_KEY, "--job-delay-ms", "200")
    yield sandbox
    stop_sandbox(sandbox)


@pytest.fixture(scope="session")
def sendgrid_sandbox() -> Iterator[EspSandbox]:
    sandbox = start_sandbox("sendgrid", "--api-key", SENDGRID_API_KEY, "--job-delay-ms", "200", "--list-ids", SENDGRID_LIST_ID,
                            "--custom-fields", SENDGRID_CUSTOM_FIELDS)
    yield sandbox
    stop_sandbox(sandbox)


@dataclass
class Sandbox(EspSandbox):
    """The Mailchimp sandbox."""

    @property
    def api(self) -> str:
        return f"{self.url}/3.0"

    async def member(self, session: aiohttp.ClientSession, email: str) -> dict[str, Any] | None:
        async with session.get(f"{self.api}/lists/sandbox/members/{subscriber_hash(email)}", headers={"Authorization": aiohttp.encode_basic_auth("t", API_KEY)}) as r:
            return await r.json() if r.status == 200 else None



def start_mailchimp(merge_fields: str = SANDBOX_FIELDS) -> Sandbox:
    """A Mailchimp sandbox process of its own, with the test audience (``merge_fields``: its merge fields, TAG:type,…)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sandboxes.mailchimp", "--port", str(port), "--api-key", API_KEY,
         "--list-id", "sandbox", "--merge-fields", merge_fields],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process=process)
    return Sandbox(f"http://127.0.0.1:{port}", process)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    started = start_mailchimp()
    yield started
    stop_sandbox(started)


@dataclass
class SentrySink:
    """A stand-in for sentry.io: a real HTTP server that decodes envelopes."""

    port: int
    envelopes: list[bytes] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.port}/1"

    def events(self) -> list[dict[str, Any]]:
        found = []
        for raw in self.envelopes:
            lines = raw.split(b"\n")
            i = 1
            while i < len(lines):
                if not lines[i].strip():
                    i += 1
                    continue
                header = json.loads(lines[i])
                payload = lines[i + 1]
                if header.get("type") == "event":
                    found.append(json.loads(payload))
                i += 2
        return found


@pytest.fixture(scope="session")
def sentry_sink() -> Iterator[SentrySink]:
    sink = SentrySink(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path.endswith("/envelope/"):
                sink.envelopes.append(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", sink.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield sink
    server.shutdown()


def spawn(env: dict[str, str], log: Path, *command: str) -> subprocess.Popen:
    """A mergetag process (``mergetag <command>``), as deployed."""
    return subprocess.Popen([sys.executable, "-m", "adapters.cli", *command], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        p.terminate()
    for p in processes:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


@dataclass
class System:
    settings: Settings
    env: dict[str, str]
    logs: Path
    db: Any
    metrics_ports: dict[str, int]
    """Where Prometheus scrapes the worker and the sync."""


def _consumers(prefix: str) -> int:
    return min(admin.consumer_counts(AMQP_URL, prefix).values())


def esp_targets(sandbox: Sandbox, klaviyo_sandbox: EspSandbox, sendgrid_sandbox: EspSandbox, **changes: dict[str, Any]) -> dict[str, Any]:
    """The three ESP targets of the test system, as its ESP file holds them (keys come from the environment)."""
    targets = {
        "mailchimp": {"kind": "mailchimp", "base_url": sandbox.api, "api_key_env": "TEST_MAILCHIMP_KEY", "audience": "sandbox",
                      "fields": MERGE_FIELDS, "max_connections": 3},
        "klaviyo": {"kind": "klaviyo", "base_url": klaviyo_sandbox.url, "api_key_env": "TEST_KLAVIYO_KEY", "fields": KLAVIYO_FIELDS,
                    "timeout_s": 5, "job_timeout_s": 10},
        "sendgrid": {"kind": "sendgrid", "base_url": sendgrid_sandbox.url, "api_key_env": "TEST_SENDGRID_KEY", "audience": SENDGRID_LIST_ID,
                     "fields": SENDGRID_FIELDS, "timeout_s": 5, "job_timeout_s": 10},
    }
    for name, change in changes.items():
        targets[name] = {**targets[name], **change}
    return targets


ESP_KEYS = {"TEST_MAILCHIMP_KEY": API_KEY, "TEST_KLAVIYO_KEY": KLAVIYO_KEY, "TEST_SENDGRID_KEY": SENDGRID_API_KEY}


@pytest.fixture(scope="session")
async def system(rabbitmq: str, mongo_uri: str, sandbox: Sandbox, klaviyo_sandbox: EspSandbox, sendgrid_sandbox: EspSandbox,
                 sentry_sink: SentrySink, tmp_path_factory) -> AsyncIterator[System]:
    """The worker and sync processes, exactly as deployed, on a queue prefix and database of their own,
    syncing to all three ESP sandboxes configured by an ESP file."""
    prefix = "t" + uuid.uuid4().hex[:10]
    logs = tmp_path_factory.mktemp("logs")
    esp_file = logs / "esps.json"
    esp_file.write_text(json.dumps(esp_targets(sandbox, klaviyo_sandbox, sendgrid_sandbox)))
    env = {
        **os.environ,
        "MERGETAG_AMQP_URL": rabbitmq,
        "MERGETAG_QUEUE_PREFIX": prefix,
        "MERGETAG_MONGODB_URI": mongo_uri,
        "MERGETAG_MONGODB_DATABASE": prefix,
        "MERGETAG_MAILCHIMP_BASE_URL": sandbox.api,
        "MERGETAG_MAILCHIMP_API_KEY": API_KEY,
        "MERGETAG_MAILCHIMP_LIST_ID": "sandbox",
        "MERGETAG_MERGE_FIELDS": json.dumps(MERGE_FIELDS),
        "MERGETAG_SHOPIFY_SECRETS": SHOPIFY_SECRET,
        "MERGETAG_RETRY_MAX": "3",
        "MERGETAG_RETRY_MIN_BACKOFF_MS": "100",
        "MERGETAG_RETRY_MAX_BACKOFF_MS": "1000",
        "MERGETAG_SYNC_GRACE_S": "1",
        "MERGETAG_SYNC_SWEEP_INTERVAL_S": "0.5",
        "MERGETAG_WORKER_THREADS": "4",
        "SENTRY_DSN": sentry_sink.dsn,
        "MERGETAG_CART_ABANDON_DELAY_S": "2",
        "MERGETAG_MAILCHIMP_MAX_CONNECTIONS": "3",
        "MERGETAG_ESP_CIRCUIT_OPEN_S": "2",
        "MERGETAG_SYNC_LEASE_S": "3",
        "MERGETAG_IDENTIFIER_LIMITS": json.dumps({"email": 2, "phone": 2, "anonymous": 20}),
        "MERGETAG_ESP_FILE": str(esp_file),
        **ESP_KEYS,
        **source_env(),
    }
    env.pop("MONGODB_URI", None)
    env["MERGETAG_GEOIP_DATABASE"] = str(build_test_database(logs / "test-city.mmdb"))
    ports = {"worker": free_port(), "sync": free_port()}
    processes = [spawn({**env, f"MERGETAG_{name.upper()}_METRICS_PORT": str(port)}, logs / f"{name}.log", name) for name, port in ports.items()]
    with mock.patch.dict(os.environ, env, clear=True):
        settings = Settings()
    client = AsyncMongoClient(mongo_uri, tz_aware=True)
    try:
        await eventually(lambda: asyncio.to_thread(_consumers, prefix), timeout=90)  # process start-up on a busy machine
        yield System(settings, env, logs, client[prefix], ports)
    finally:
        stop(processes)
        await client.close()
        delete_queues(prefix)


@dataclass
class Pipeline:
    """A receiver and a worker of their own, with the sync down until :meth:`start_sync`."""

    env: dict[str, str]
    url: str
    db: Any
    logs: Path
    processes: list[subprocess.Popen]

    def start_sync(self) -> None:
        """One more sync process, logging to a file of its own (``sync.log``, then ``sync-2.log``, ...)."""
        n = len(list(self.logs.glob("sync*.log")))
        self.processes.append(spawn(self.env, self.logs / ("sync.log" if n == 0 else f"sync-{n + 1}.log"), "sync"))


@asynccontextmanager
async def own_pipeline(mongo_uri: str, sandbox: Sandbox | None, logs: Path, **settings: str) -> AsyncIterator[Pipeline]:
    """A pipeline on a queue prefix and database of its own, syncing to the Mailchimp sandbox only
    (``sandbox`` None: to the ESPs ``settings`` name).

    Parameters:
      settings: extra ``MERGETAG_*`` variables.
    """
    prefix = "o" + uuid.uuid4().hex[:10]
    mailchimp = {"MERGETAG_MAILCHIMP_BASE_URL": sandbox.api, "MERGETAG_MAILCHIMP_API_KEY": API_KEY,
                 "MERGETAG_MAILCHIMP_LIST_ID": "sandbox"} if sandbox is not None else {}
    env = {**os.environ, **source_env(), "MERGETAG_AMQP_URL": AMQP_URL, "MERGETAG_QUEUE_PREFIX": prefix,
           "MERGETAG_MONGODB_URI": mongo_uri, "MERGETAG_MONGODB_DATABASE": prefix, "MERGETAG_SHOPIFY_SECRETS": SHOPIFY_SECRET,
           **mailchimp}
    env.pop("MONGODB_URI", None)
    env.pop("MERGETAG_ESP_FILE", None)
    env.update(settings)
    with mock.patch.dict(os.environ, env, clear=True):
        app = create_app(Settings())
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    client = AsyncMongoClient(mongo_uri, tz_aware=True)
    pipeline = Pipeline(env, str(server.make_url("")).rstrip("/"), client[prefix], logs,
                        [spawn(env, logs / "worker.log", "worker")])
    try:
        yield pipeline
    finally:
        stop(pipeline.processes)
        await server.close()
        await client.drop_database(prefix)
        await client.close()
        delete_queues(prefix)


@pytest.fixture(scope="session")
async def receiver(system: System) -> AsyncIterator[str]:
    """The real receiver app on a real port, publishing to the system's queues."""
    with mock.patch.dict(os.environ, system.env):
        app = create_app(system.settings)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
