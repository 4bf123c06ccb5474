"""After an outage of the sync, a consent change goes ahead of the bulk backlog."""

import os
import uuid
from unittest import mock

from aiohttp.test_utils import TestServer
from pymongo import AsyncMongoClient

from adapters.dev import free_port
from adapters.receiver import create_app
from adapters.settings import Settings
from broker import admin
from tests.conftest import AMQP_URL, API_KEY, SHOPIFY_SECRET, eventually, post_webhook, source_env, spawn, stop
from tests.samples import customer


async def test_consent_changes_drain_before_the_bulk_backlog(rabbitmq, mongo_uri, sandbox, http, tmp_path):
    prefix = "o" + uuid.uuid4().hex[:10]
    env = {**os.environ, **source_env(), "MERGETAG_AMQP_URL": AMQP_URL, "MERGETAG_QUEUE_PREFIX": prefix,
           "MERGETAG_MONGODB_URI": mongo_uri, "MERGETAG_MONGODB_DATABASE": prefix, "MERGETAG_SHOPIFY_SECRETS": SHOPIFY_SECRET,
           "MERGETAG_MAILCHIMP_BASE_URL": sandbox.api, "MERGETAG_MAILCHIMP_API_KEY": API_KEY, "MERGETAG_MAILCHIMP_LIST_ID": "sandbox",
           "MERGETAG_WORKER_THREADS": "1", "MERGETAG_SYNC_GRACE_S": "30"}
    env.pop("MONGODB_URI", None)
    with mock.patch.dict(os.environ, env, clear=True):
        app = create_app(Settings())
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    worker = spawn(env, tmp_path / "worker.log", "worker")  # merges, but the sync is down: an outage
    client = AsyncMongoClient(mongo_uri, tz_aware=True)
    sync = None
    try:
        emails = [f"bulk{n}-{uuid.uuid4().hex[:6]}@example.com" for n in range(25)]
        for email in emails:
            assert (await post_webhook(http, url, "customers/create", customer(email))).status == 202
        urgent = emails[-1]
        unsubscribe = {"customer_id": 1, "email_address": urgent,
                       "email_marketing_consent": {"state": "unsubscribed", "consent_updated_at": "2030-01-01T00:00:00Z"}}
        assert (await post_webhook(http, url, "customers_email_marketing_consent/update", unsubscribe)).status == 202

        async def merged():
            doc = await client[prefix].profiles.find_one({"email": urgent})
            return doc and doc["consent"].get("email", {}).get("state") == "unsubscribed"

        await eventually(merged, timeout=60)
        before = len(await sandbox.control(http, "history"))
        sync = spawn(env, tmp_path / "sync.log", "sync")  # the sync comes back to a backlog

        async def drained():
            history = (await sandbox.control(http, "history"))[before:]
            firsts = []
            for _, email, _ in history:
                if email in emails and email not in firsts:
                    firsts.append(email)
            return firsts if len(firsts) == len(emails) else None

        order = await eventually(drained, timeout=60)
        assert order.index(urgent) <= 2, order[:5]  # ahead of 24 bulk updates queued before it
        assert (await sandbox.member(http, urgent))["status"] == "unsubscribed"
    finally:
        stop([p for p in (worker, sync) if p])
        await server.close()
        await client.drop_database(prefix)
        await client.close()
        admin.drop_queues(AMQP_URL, prefix)
