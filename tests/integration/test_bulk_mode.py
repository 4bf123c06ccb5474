"""Efficient when heavy: a backlog past MERGETAG_SYNC_BULK_BACKLOG goes out in bulk requests, not one by one."""

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


async def test_a_backlog_goes_in_bulk(rabbitmq, mongo_uri, sandbox, http, tmp_path):
    prefix = "k" + uuid.uuid4().hex[:10]
    env = {**os.environ, **source_env(), "MERGETAG_AMQP_URL": AMQP_URL, "MERGETAG_QUEUE_PREFIX": prefix,
           "MERGETAG_MONGODB_URI": mongo_uri, "MERGETAG_MONGODB_DATABASE": prefix, "MERGETAG_SHOPIFY_SECRETS": SHOPIFY_SECRET,
           "MERGETAG_MAILCHIMP_BASE_URL": sandbox.api, "MERGETAG_MAILCHIMP_API_KEY": API_KEY, "MERGETAG_MAILCHIMP_LIST_ID": "sandbox",
           "MERGETAG_SYNC_BULK_BACKLOG": "10", "MERGETAG_SYNC_SWEEP_INTERVAL_S": "0.5"}
    env.pop("MONGODB_URI", None)
    env.pop("MERGETAG_ESP_FILE", None)
    with mock.patch.dict(os.environ, env, clear=True):
        app = create_app(Settings())
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    worker = spawn(env, tmp_path / "worker.log", "worker")  # merges while the sync is down: a backlog builds
    client = AsyncMongoClient(mongo_uri, tz_aware=True)
    sync = None
    try:
        emails = [f"heavy{n}-{uuid.uuid4().hex[:6]}@example.com" for n in range(60)]
        for email in emails:
            assert (await post_webhook(http, url, "customers/create", customer(email, first_name="Heavy"))).status == 202

        async def merged():
            return await client[prefix].profiles.count_documents({"email": {"$in": emails}, "esp.mailchimp.pending": True}) == len(emails)

        await eventually(merged, timeout=60)
        await sandbox.control(http, "stats/reset", {})
        sync = spawn(env, tmp_path / "sync.log", "sync")  # 60 queued syncs meet a backlog past the threshold

        async def delivered():
            done = await client[prefix].profiles.count_documents({"email": {"$in": emails}, "esp.mailchimp.pending": False})
            return done == len(emails)

        await eventually(delivered, timeout=60)
        members = [await sandbox.member(http, e) for e in emails]
        assert all(m and m["merge_fields"]["FNAME"] == "Heavy" for m in members)
        requests = (await sandbox.control(http, "stats"))["requests"]
        bulk, single = requests.get("POST /3.0/batches", 0), requests.get("PUT /3.0/lists/{list_id}/members/{hash}", 0)
        # Singles only until the sync has counted the backlog (once a second per process); the rest in bulk.
        assert bulk >= 1 and single + bulk < len(emails) // 2, requests
    finally:
        stop([p for p in (worker, sync) if p])
        await server.close()
        await client.drop_database(prefix)
        await client.close()
        admin.drop_queues(AMQP_URL, prefix)
