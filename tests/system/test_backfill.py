"""A backfill as operators run it: ``mergetag pull shopify --since … --wait --json`` against a Shopify
sandbox of its own, through a worker and a sync of their own, to the Mailchimp sandbox."""

import asyncio
import json
import os
import subprocess
import sys
import uuid

import pytest
from pymongo import MongoClient

from broker import admin, topology
from sandboxes.local import free_port, wait_for_port
from sandboxes.shopify import API_VERSION
from tests.conftest import ROOT, own_pipeline

TOKEN = "shpat_backfill"
CUSTOMERS, ORDERS = 300, 300


@pytest.fixture(scope="module")
def shop():
    """A shop holding exactly the demo customers and their orders (one each), on Shopify's default bucket."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sandboxes.shopify", "--port", str(port), "--token", TOKEN,
                                "--demo-customers", str(CUSTOMERS), "--demo-orders", str(ORDERS)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process=process)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


async def test_a_backfill_waits_until_everything_is_merged_and_synced_and_says_what_it_cost(shop, mongo_uri, sandbox, http, tmp_path):
    async with own_pipeline(mongo_uri, sandbox, tmp_path, MERGETAG_SYNC_GRACE_S="1", MERGETAG_SYNC_SWEEP_INTERVAL_S="0.5") as pipeline:
        pipeline.start_sync()
        env = {**pipeline.env, "MERGETAG_SHOPIFY_ADMIN_URL": f"{shop}/admin/api/{API_VERSION}", "MERGETAG_SHOPIFY_ADMIN_TOKEN": TOKEN}
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "adapters.cli", "pull", "shopify", "--since", "1970-01-01",
                                                       "--wait", "--json", "--deadline", "400", "--settle", "10"],
                                      cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads(out.stdout.splitlines()[-1])

        # The pull: exactly what the shop holds, one event published per record.
        assert {r: v["records"] for r, v in summary["resources"].items()} == {"customers": CUSTOMERS, "orders": ORDERS}
        assert summary["records"] == summary["events_published"] == CUSTOMERS + ORDERS
        assert summary["resources"]["customers"]["pages"] == 2 and summary["events_per_s"] > 0
        # Progress went to stderr as plain lines (not a terminal): no cursor movement or redraws.
        assert "\x1b" not in out.stderr and f"customers: {CUSTOMERS:,} records, 2 pages" in out.stderr

        wait = summary["wait"]
        assert wait["drained"] and wait["pending"] == {"mailchimp": 0}
        assert not [q for q in wait["queued"] if ".events" in q]  # sync messages may be left: they find nothing to send
        assert wait["dead_letters"] == {queue: 0 for queue in topology.all_queues(pipeline.db.name)}
        assert wait["store"]["requests"] > 0 and wait["store"]["per_event"] > 0
        mailchimp = wait["esp"]["mailchimp"]
        assert mailchimp["profiles_synced"] == CUSTOMERS
        assert mailchimp["minimum_requests"] == 1  # 300 profiles, 500 to a batch
        assert mailchimp["write_requests"] >= mailchimp["minimum_requests"]

        # What --wait claimed, read back at once (no polling: that is the claim; the settle time above is generous
        # because a merge a worker holds, on a busy machine, is invisible to the queue): every customer merged with their order and synced as it is now.
        profiles = [doc async for doc in pipeline.db.profiles.find({}, {"esp.mailchimp": 1})]
        assert len(profiles) == CUSTOMERS
        states = [doc["esp"]["mailchimp"] for doc in profiles]
        assert all(s["sent_hash"] == s["member_hash"] and s["member"]["merge_fields"]["ORDERS"] == 1 for s in states)
        for n in (0, CUSTOMERS // 2, CUSTOMERS - 1):
            member = await sandbox.member(http, f"pulled-{n}@example.com")
            assert member["merge_fields"]["FNAME"] == f"Pat{n}" and member["merge_fields"]["ORDERS"] == 1


def test_the_pull_summary_without_json_is_for_people(shop, mongo_uri, rabbitmq):
    prefix = "b" + uuid.uuid4().hex[:10]
    env = {**os.environ, "MERGETAG_QUEUE_PREFIX": prefix, "MERGETAG_MONGODB_URI": mongo_uri, "MERGETAG_MONGODB_DATABASE": prefix,
           "MERGETAG_AMQP_URL": rabbitmq, "MERGETAG_SHOPIFY_ADMIN_URL": f"{shop}/admin/api/{API_VERSION}",
           "MERGETAG_SHOPIFY_ADMIN_TOKEN": TOKEN}
    env.pop("MONGODB_URI", None)
    try:
        out = subprocess.run([sys.executable, "-m", "adapters.cli", "pull", "shopify", "--resource", "customers", "--since", "1970-01-01",
                              "--progress-every", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    finally:
        admin.drop_queues(rabbitmq, prefix)
        with MongoClient(mongo_uri) as client:
            client.drop_database(prefix)
    assert out.stdout.startswith(f"customers: {CUSTOMERS:,} records in 2 pages")
    assert f"published {CUSTOMERS:,} events" in out.stdout and "{" not in out.stdout
    assert out.stderr.count("customers: ") == 3 and "\x1b" not in out.stderr  # a line per page, and one when it ended
