"""Invalid events are kept in quarantine with every error, counted per reason, and re-driven after a fix."""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import uuid
from unittest import mock

from aiohttp.test_utils import TestServer
from pymongo import AsyncMongoClient

from adapters.http.receiver import create_app
from adapters.settings import Settings
from broker import admin
from sandboxes.local import free_port
from tests.conftest import AMQP_URL, API_KEY, ROOT, SOURCES, eventually, source_env, spawn, stop


def cli(env, *args):
    out = subprocess.run([sys.executable, "-m", "adapters.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


def with_time_path(path: str) -> dict:
    sources = json.loads(json.dumps(SOURCES))
    sources["legacy"]["mapping"]["purchase"]["event_time"] = path
    return sources


async def test_quarantine_then_fix_the_mapping_then_redrive(rabbitmq, mongo_uri, tmp_path, http):
    prefix = "q" + uuid.uuid4().hex[:10]
    env = {**os.environ, **source_env(), "MERGETAG_AMQP_URL": AMQP_URL, "MERGETAG_QUEUE_PREFIX": prefix,
           "MERGETAG_MONGODB_URI": mongo_uri, "MERGETAG_MONGODB_DATABASE": prefix, "MERGETAG_MAILCHIMP_BASE_URL": "http://127.0.0.1:1/3.0",
           "MERGETAG_MAILCHIMP_API_KEY": API_KEY, "MERGETAG_MAILCHIMP_LIST_ID": "sandbox",
           # The legacy CRM's mapping points at the wrong field for the time: every purchase fails validation.
           "MERGETAG_SOURCES": json.dumps(with_time_path("when"))}
    env.pop("MONGODB_URI", None)
    with mock.patch.dict(os.environ, env, clear=True):
        app = create_app(Settings())
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    worker = spawn(env, tmp_path / "worker-1.log", "worker")
    client = AsyncMongoClient(mongo_uri, tz_aware=True)
    db = client[prefix]
    try:
        await eventually(consumers_ready_events(prefix), timeout=60)
        email = f"q-{uuid.uuid4().hex[:8]}@example.com"
        body = json.dumps({"kind": "purchase", "uid": "P-1", "at": "2025-04-01T09:30:00Z", "when": "yesterday",
                           "amount_cents": 1000, "buyer": {"email": email}}).encode()
        signature = "sha256=" + base64.b64encode(hmac.new(b"legacy-crm-secret", body, hashlib.sha256).digest()).decode()
        async with http.post(f"{str(server.make_url('')).rstrip('/')}/webhooks/legacy", data=body,
                             headers={"X-Legacy-Signature": signature}) as r:
            assert r.status == 202

        async def quarantined():
            return await db.quarantine.find_one({"_id": "legacy:P-1"})

        doc = await eventually(quarantined)
        assert doc["status"] == "quarantined" and doc["schema_version"] == "1.1"
        assert doc["delivery"]["payload"]["uid"] == "P-1"  # the source payload, kept whole
        assert [e["loc"] for e in doc["errors"]] == ["order.completed.event_time"]
        assert email not in json.dumps(doc["errors"])
        listed = await asyncio.to_thread(cli, env, "quarantine", "list", "--json")
        assert listed["counts"] == {"order.completed:order.completed.event_time:datetime_from_date_parsing": 1}
        assert await db.profiles.find_one({"email": email}) is None
        unfixed = await asyncio.to_thread(cli, env, "quarantine", "redrive", "--all", "--dry-run")
        assert unfixed["passing"] == 0 and unfixed["would_fail_again"] == {"order.completed:order.completed.event_time:datetime_from_date_parsing": 1}

        # The fix: the mapping reads the right field. Workers restart with it; the operator re-drives.
        stop([worker])
        env["MERGETAG_SOURCES"] = json.dumps(with_time_path("at"))
        worker = spawn(env, tmp_path / "worker-2.log", "worker")
        await eventually(consumers_ready_events(prefix), timeout=60)
        # The plan first, under the fixed mapping: it would pass now, and the dry run changed nothing.
        assert (await asyncio.to_thread(cli, env, "quarantine", "redrive", "legacy:P-1", "--dry-run")) == {
            "deliveries": 1, "passing": 1, "events": 1, "would_fail_again": {}, "passing_ids": ["legacy:P-1"]}
        assert (await db.quarantine.find_one({"_id": "legacy:P-1"}))["status"] == "quarantined"
        assert (await asyncio.to_thread(cli, env, "quarantine", "redrive", "legacy:P-1", "--rate", "5")) == {
            "redriven": ["legacy:P-1"], "count": 1, "requarantined": 0, "skipped": 0, "failed": 0}

        async def merged():
            return await db.profiles.find_one({"email": email})

        profile = await eventually(merged)
        assert profile["computed"]["order_count"] == 1
        assert (await db.quarantine.find_one({"_id": "legacy:P-1"}))["status"] == "redriven"
        assert (await asyncio.to_thread(cli, env, "quarantine", "redrive", "--all")) == {
            "redriven": [], "count": 0, "requarantined": 0, "skipped": 0, "failed": 0}
    finally:
        stop([worker])
        await server.close()
        await client.drop_database(prefix)
        await client.close()
        admin.drop_queues(AMQP_URL, prefix)


def consumers_ready_events(prefix):
    async def check():
        return (await asyncio.to_thread(admin.consumer_counts, AMQP_URL, prefix))[f"{prefix}.events"]

    return check


def delivery(n: int) -> dict:
    return {"source": "legacy", "topic": "purchase", "delivery_id": f"D-{n:04d}", "schema_version": "1.1",
            "received_at": "2025-04-01T09:30:00Z", "payload": {"kind": "purchase", "uid": f"D-{n:04d}"}}


ERRORS = [{"event": "order.completed", "loc": "order.completed.event_time", "type": "datetime_from_date_parsing", "msg": "x"}]


async def test_a_delivery_quarantined_again_while_it_is_redriven_stays_quarantined_and_listed(rabbitmq, mongo_uri):
    """The race: the redrive reads the delivery and publishes it; a worker fails it again (quarantined anew)
    before the redrive marks it. The mark must not hide it."""
    from adapters.store.quarantine import Quarantine
    from broker import topology
    from broker.publisher import Publisher, encode_message

    prefix = "r" + uuid.uuid4().hex[:10]
    client = AsyncMongoClient(mongo_uri, tz_aware=True)
    quarantine = Quarantine(client, prefix)
    queue = topology.events_queue(prefix)
    publisher = Publisher(AMQP_URL, [queue], 5)
    try:
        key = await quarantine.put(delivery(1), ERRORS, "1.1")
        read = await quarantine.get(key)

        async def publish_then_a_worker_quarantines_it_again(payload: dict) -> None:
            message_id, body = encode_message(queue, topology.PROCESS_EVENT_ACTOR, (payload,))
            await publisher.publish(queue, body, message_id)
            await quarantine.put(payload, ERRORS, "1.1")

        report = await quarantine.redrive(publish_then_a_worker_quarantines_it_again, [key])
        assert report.summary() == {"redriven": [], "count": 0, "requarantined": 1, "skipped": 0, "failed": 0}
        assert report.published == 1  # a redrive's progress counts it: it went back through the pipeline
        doc = await quarantine.get(key)
        assert doc["status"] == "quarantined" and doc["attempts"] == 2
        assert [d["_id"] for d in await quarantine.list()] == [key]
        assert admin.queue_depths(AMQP_URL, prefix)[queue] == 1  # it was published all the same

        # The same race, step by step: the mark guarded on what was read before publishing does not apply.
        await quarantine.put(delivery(1), ERRORS, "1.1")
        assert not await quarantine.mark_redriven(key, read["attempts"])
        assert (await quarantine.get(key))["status"] == "quarantined"
        # Unchanged since it was read: the mark applies.
        assert await quarantine.mark_redriven(key, (await quarantine.get(key))["attempts"])
        assert await quarantine.list() == []
    finally:
        await publisher.close()
        await client.drop_database(prefix)
        await client.close()
        admin.drop_queues(AMQP_URL, prefix)


async def test_redrive_all_redrives_every_quarantined_delivery_page_by_page_and_counts_them(rabbitmq, mongo_uri):
    from adapters.store.quarantine import Quarantine
    from broker import topology

    prefix = "a" + uuid.uuid4().hex[:10]
    env = {**os.environ, "MERGETAG_AMQP_URL": AMQP_URL, "MERGETAG_QUEUE_PREFIX": prefix, "MERGETAG_MONGODB_URI": mongo_uri,
           "MERGETAG_MONGODB_DATABASE": prefix}
    env.pop("MONGODB_URI", None)
    client = AsyncMongoClient(mongo_uri, tz_aware=True)
    quarantine = Quarantine(client, prefix)
    try:
        keys = [await quarantine.put(delivery(n), ERRORS, "1.1") for n in range(250)]
        first = await asyncio.to_thread(cli, env, "quarantine", "list", "--json")
        assert len(first["quarantined"]) == 100 and first["total"] == 250 and first["more"] == 150
        assert [row["id"] for row in first["quarantined"]] == sorted(keys)[:100]
        last = await asyncio.to_thread(cli, env, "quarantine", "list", "--json", "--limit", "200", "--after", first["next"])
        assert [row["id"] for row in last["quarantined"]] == sorted(keys)[100:] and last["more"] == 0 and last["next"] is None

        report = await asyncio.to_thread(cli, env, "quarantine", "redrive", "--all")
        assert sorted(report["redriven"]) == sorted(keys)
        assert {k: v for k, v in report.items() if k != "redriven"} == {"count": 250, "requarantined": 0, "skipped": 0, "failed": 0}
        assert await quarantine.count() == 0
        assert await client[prefix].quarantine.count_documents({"status": "redriven"}) == 250
        assert admin.queue_depths(AMQP_URL, prefix)[topology.events_queue(prefix)] == 250
        assert (await asyncio.to_thread(cli, env, "quarantine", "redrive", "--all"))["count"] == 0
    finally:
        await client.drop_database(prefix)
        await client.close()
        admin.drop_queues(AMQP_URL, prefix)


async def test_a_delivery_bson_cannot_encode_is_kept_whole_and_given_back_for_redrive(mongo_uri):
    from adapters.store.quarantine import Quarantine

    name = "qs" + uuid.uuid4().hex[:10]
    client = AsyncMongoClient(mongo_uri, tz_aware=True)
    quarantine = Quarantine(client, name)
    unstorable = {"source": "tracking", "topic": "identify", "delivery_id": "m-\ud800", "received_at": "2026-01-01T00:00:00Z",
                  "payload": {"traits": {"first_name": "Ada\udfff", "\udc00": 1}, "big": 2**70}}
    errors = [{"event": "customer.identified", "loc": "customer.identified.traits.\udc00", "type": "invalid_unicode", "msg": "m"}]
    try:
        key = await quarantine.put(unstorable, errors, "1.1")
        assert await quarantine.put(unstorable, errors, "1.1") == key == "tracking:m-\\ud800"
        doc = await quarantine.get(key)
        assert doc["attempts"] == 2
        assert Quarantine.delivery(doc) == unstorable
        assert doc["delivery"] == {"source": "tracking", "topic": "identify", "delivery_id": "m-\\ud800",
                                   "received_at": "2026-01-01T00:00:00Z", "kept_as": "delivery_json"}
        assert await quarantine.counts() == {"customer.identified:customer.identified.traits.\\udc00:invalid_unicode": 1}

        storable = {**unstorable, "delivery_id": "m-1", "payload": {"traits": {"first_name": "Ada"}}}
        doc = await quarantine.get(await quarantine.put(storable, errors, "1.1"))
        assert doc["delivery"] == storable and "delivery_json" not in doc and Quarantine.delivery(doc) == storable
    finally:
        await client.drop_database(name)
        await client.close()
