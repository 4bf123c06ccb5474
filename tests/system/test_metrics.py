"""Every process's ``/metrics``, scraped over HTTP and parsed with prometheus-client's parser, moves
when events flow: the receiver's deliveries, the worker's merges, the sync's ESP requests and
freshness, and what the admin reads from the broker, the store and the guards."""

import asyncio
import base64
import hashlib
import hmac
import json
import re
import uuid

import dramatiq
import pika

from adapters.redis.trail import Trail
from broker import topology
from sandboxes.local import free_port, wait_for_port
from tests.conftest import AMQP_URL, HMAC_SECRET, eventually, post_webhook, spawn, stop
from tests.support.metrics import samples, value
from tests.support.samples import customer


async def scrape(http, url: str) -> str:
    async with http.get(f"{url}/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


def publish_broken_message(queue: str, delivery_id: str) -> None:
    """A message its actor cannot run (a bug, as far as the worker can tell): retried, then dead-lettered."""
    delivery = {"source": "shopify", "delivery_id": delivery_id}
    message = dramatiq.Message(queue_name=queue, actor_name=topology.PROCESS_EVENT_ACTOR, args=(delivery,), kwargs={"bogus": 1}, options={})
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        connection.channel().basic_publish("", queue, message.encode(), pika.BasicProperties(delivery_mode=2, priority=0))
    finally:
        connection.close()


async def test_every_process_serves_metrics_that_move_when_events_flow(receiver, sandbox, system, http, tmp_path):
    admin_port = free_port()
    admin = spawn({**system.env, "MERGETAG_ADMIN_TOKEN": "metrics-admin-token"}, tmp_path / "admin.log", "admin", "--port", str(admin_port))
    try:
        worker_url, sync_url = (f"http://127.0.0.1:{system.metrics_ports[name]}" for name in ("worker", "sync"))
        await asyncio.to_thread(wait_for_port, admin_port, timeout=90, process=admin)
        admin_url = f"http://127.0.0.1:{admin_port}"
        for url in (worker_url, sync_url):
            await eventually(lambda url=url: scrape(http, url), timeout=60)
        before = {name: await scrape(http, url) for name, url in
                  (("receiver", receiver), ("worker", worker_url), ("sync", sync_url), ("admin", admin_url))}

        email = f"metrics-{uuid.uuid4().hex[:10]}@example.com"
        assert (await post_webhook(http, receiver, "customers/create", customer(email, first_name="Mae"))).status == 202
        await eventually(lambda: sandbox.member(http, email))

        # A delivery that fails validation: quarantined with its reason.
        body = json.dumps({"kind": "purchase", "uid": f"P-{uuid.uuid4().hex[:8]}", "at": "2025-04-01T09:30:00Z",
                           "amount_cents": 10**28, "buyer": {"email": f"q-{email}"}}).encode()
        signature = "sha256=" + base64.b64encode(hmac.new(HMAC_SECRET.encode(), body, hashlib.sha256).digest()).decode()
        async with http.post(f"{receiver}/webhooks/legacy", data=body, headers={"X-Legacy-Signature": signature}) as r:
            assert r.status == 202
        events = topology.events_queue(system.settings.queue_prefix)
        broken = f"broken-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(publish_broken_message, events, broken)

        def grew(name: str, metric: str, **labels: str):
            async def check():
                text = await scrape(http, {"receiver": receiver, "worker": worker_url, "sync": sync_url, "admin": admin_url}[name])
                return text if value(text, metric, **labels) > value(before[name], metric, **labels) else None
            return check

        await eventually(grew("receiver", "mergetag_deliveries_total", source="shopify", outcome="accepted"))
        await eventually(grew("worker", "mergetag_events_merged_total", result="changed"))
        await eventually(grew("worker", "mergetag_events_merged_total", result="quarantined"))
        await eventually(grew("worker", "mergetag_merge_seconds_count"))
        await eventually(grew("sync", "mergetag_members_synced_total", target="mailchimp"))
        await eventually(grew("sync", "mergetag_freshness_seconds_count", target="mailchimp"))
        await eventually(grew("sync", "mergetag_esp_request_seconds_count", target="mailchimp"))
        text = await eventually(grew("sync", "mergetag_esp_requests_total", target="mailchimp"))
        statuses = {labels["status"] for name, labels, _ in samples(text) if name == "mergetag_esp_requests_total"}
        assert statuses and all(s.isdigit() or s in ("timeout", "unreachable") for s in statuses)
        assert any(name == "mergetag_sweeper_backlog" and labels["target"] == "mailchimp" for name, labels, _ in samples(text))
        assert value(text, "mergetag_esp_circuit", target="mailchimp") == 0

        await eventually(grew("admin", "mergetag_quarantined", reason="order.completed:order.completed.total:less_than_equal"))
        text = await eventually(grew("admin", "mergetag_dead_letters", queue=events), timeout=90)
        depths = {labels["queue"] for name, labels, _ in samples(text) if name == "mergetag_queue_depth"}
        assert {events, topology.xq_name(events), topology.sync_queue(system.settings.queue_prefix)} <= depths
        assert value(text, "mergetag_queue_depth", queue=topology.xq_name(events)) >= 1
        assert value(text, "mergetag_esp_rate_scale", target="mailchimp") > 0
        # The dead letter is the last stage of its delivery's trail.
        trail = Trail(system.settings.redis_url, system.settings.queue_prefix)
        try:
            entries = await eventually(lambda: trail.read(f"delivery:shopify:{broken}"))
        finally:
            await trail.close()
        assert entries[-1]["stage"] == "dead-lettered" and entries[-1]["actor"] == topology.PROCESS_EVENT_ACTOR
        assert entries[-1]["reason"] == "unexpected_error" and entries[-1]["letter"]
        # No person in any label: no address, no profile id.
        for page in (text, *[await scrape(http, url) for url in (receiver, worker_url, sync_url)]):
            values = [v for _, labels, _ in samples(page) for v in labels.values()]
            assert email not in page and not [v for v in values if "@" in v or re.fullmatch(r"p_[0-9a-f]{32}", v)]
    finally:
        stop([admin])
