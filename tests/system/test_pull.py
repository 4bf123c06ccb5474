"""REST pulls against a Shopify Admin sandbox that follows the real pagination and rate-limit contract."""

import asyncio
import json
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from pymongo import AsyncMongoClient

from adapters.sources.shopify.pull import ShopifyPuller, next_link
from adapters.store.checkpoints import Checkpoints
from broker import admin, topology
from broker.publisher import Publisher, publish_delivery
from sandboxes.local import free_port, wait_for_port
from sandboxes.shopify import API_VERSION, demo_customers
from tests.conftest import AMQP_URL, ROOT, eventually, post_webhook

TOKEN = "shpat_test"


@pytest.fixture(scope="module")
def shop():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sandboxes.shopify", "--port", str(port), "--token", TOKEN,
                                "--capacity", "8", "--leak", "4"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process=process)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


async def seed(http, shop, records, resource="customers"):
    async with http.post(f"{shop}/_sandbox/{resource}", json=records) as r:
        assert r.status == 200


def orders(start: datetime, **states: dict) -> list[dict]:
    """One order per state (name -> its closed_at/cancelled_at fields), a minute apart, ids unique to this call."""
    base = 5_000_000_000_000 + uuid.uuid4().int % 10**9 * 10
    return [{"id": base + i, "admin_graphql_api_id": f"gid://shopify/Order/{base + i}", "email": f"{name}@example.com", "name": name,
             "total_price": "10.00", "currency": "EUR", "closed_at": None, "cancelled_at": None, "line_items": [],
             "created_at": (start + timedelta(minutes=i)).isoformat(), "updated_at": (start + timedelta(minutes=i)).isoformat(), **fields}
            for i, (name, fields) in enumerate(states.items())]


@pytest.fixture
async def pull_env(rabbitmq, mongo_uri):
    prefix = "p" + uuid.uuid4().hex[:10]
    queue = topology.events_queue(prefix)
    publisher = Publisher(AMQP_URL, [queue], 5)
    client = AsyncMongoClient(mongo_uri, tz_aware=True)
    checkpoints = Checkpoints(client, prefix)

    def puller(shop, page_size=25):
        return ShopifyPuller(f"{shop}/admin/api/{API_VERSION}", TOKEN, publish=lambda d: publish_delivery(publisher, queue, d),
                             checkpoints=checkpoints, page_size=page_size)

    def queued() -> list[dict]:
        import dramatiq
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel, found = connection.channel(), []
        while True:
            method, _, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            found.append(dramatiq.Message.decode(body).args[0])
        connection.close()  # unacked: back in the queue
        return found

    yield puller, checkpoints, queued
    await publisher.close()
    await client.drop_database(prefix)
    await client.close()
    admin.drop_queues(AMQP_URL, prefix)


def test_link_header_parsing_follows_shopify_format():
    header = ('<https://s.myshopify.com/admin/api/2024-10/customers.json?limit=2&page_info=abc>; rel="previous", '
              '<https://s.myshopify.com/admin/api/2024-10/customers.json?limit=2&page_info=def>; rel="next"')
    assert next_link(header).endswith("page_info=def")
    assert next_link(header.split(", ")[0]) is None
    assert next_link(None) is None


async def test_sandbox_enforces_the_pagination_contract(shop, http):
    headers = {"X-Shopify-Access-Token": TOKEN}
    await seed(http, shop, demo_customers(5, datetime(2020, 1, 1, tzinfo=timezone.utc)))
    url = f"{shop}/admin/api/{API_VERSION}/customers.json"
    async with http.get(url, params={"limit": 2}, headers={"X-Shopify-Access-Token": "wrong"}) as r:
        assert r.status == 401
    async with http.get(url, params={"limit": 2, "updated_at_min": "2020-01-01T00:00:00Z"}, headers=headers) as r:
        assert r.status == 200 and "X-Shopify-Shop-Api-Call-Limit" in r.headers
        nxt = next_link(r.headers["Link"])
    async with http.get(nxt + "&updated_at_min=2020-01-01", headers=headers) as r:
        assert r.status == 400 and "page_info" in (await r.json())["errors"]
    async with http.get(url, params={"limit": 251}, headers=headers) as r:
        assert r.status == 400


async def test_sandbox_lists_only_open_orders_unless_asked_for_any_status(shop, http):
    start = datetime(2019, 6, 1, tzinfo=timezone.utc)
    seeded = orders(start, open={}, closed={"closed_at": "2019-06-02T00:00:00+00:00"},
                    cancelled={"cancelled_at": "2019-06-02T00:00:00+00:00", "cancel_reason": "customer"})
    await seed(http, shop, seeded, "orders")
    url, headers = f"{shop}/admin/api/{API_VERSION}/orders.json", {"X-Shopify-Access-Token": TOKEN}
    mine = {o["id"]: o["name"] for o in seeded}

    async def get(target: str, params: dict | None = None) -> tuple[int, dict, str | None]:
        """One listing call; a 429 from the bucket (shared with the other tests) is waited out, as a client does."""
        async def answer():
            async with http.get(target, params=params, headers=headers) as r:
                return None if r.status == 429 else (r.status, await r.json(), r.headers.get("Link"))

        return await eventually(answer, timeout=30, interval=0.5)

    async def names(**params) -> list[str]:
        status, body, link = await get(url, {"limit": 2, "updated_at_min": start.isoformat(), **params})
        assert status == 200
        found = [o["name"] for o in body["orders"] if o["id"] in mine]
        while next_link(link):  # the status is kept in the cursor, as Shopify keeps it in page_info
            status, body, link = await get(next_link(link))
            found += [o["name"] for o in body["orders"] if o["id"] in mine]
        return found

    assert await names() == ["open"]
    assert await names(status="any") == ["open", "closed", "cancelled"]
    assert await names(status="cancelled") == ["cancelled"]
    assert (await get(url, {"status": "bogus"}))[0] == 400


async def test_order_pulls_include_closed_and_cancelled_orders(shop, http, pull_env):
    puller, _, queued = pull_env
    start = datetime(2018, 3, 1, tzinfo=timezone.utc)
    seeded = orders(start, open={}, closed={"closed_at": "2018-03-02T00:00:00+00:00"},
                    cancelled={"cancelled_at": "2018-03-02T00:00:00+00:00", "cancel_reason": "fraud"})
    await seed(http, shop, seeded, "orders")
    result = await puller(shop, page_size=2).pull("orders", since=start.isoformat())
    pulled = {m["payload"]["id"]: m for m in queued() if m["topic"] == "orders/updated"}
    assert {o["id"] for o in seeded} <= set(pulled)
    assert result.records >= len(seeded)
    cancelled = next(o for o in seeded if o["name"] == "cancelled")
    assert pulled[cancelled["id"]]["payload"]["cancelled_at"] == "2018-03-02T00:00:00+00:00"  # so the merge stops counting it


async def test_pull_pages_through_everything_and_keeps_a_checkpoint(shop, http, pull_env):
    puller, checkpoints, queued = pull_env
    start = datetime(2021, 1, 1, tzinfo=timezone.utc)
    await seed(http, shop, demo_customers(60, start))
    result = await puller(shop).pull("customers", since="2021-01-01T00:00:00+00:00")
    assert (result.records, result.pages) == (60, 3)
    messages = queued()
    assert len(messages) == 60
    assert {m["topic"] for m in messages} == {"customers/update"}
    checkpoint = (await checkpoints.get("shopify:customers"))["since"]
    began = datetime.fromisoformat(checkpoint)
    assert timedelta(minutes=4) < datetime.now(timezone.utc) - began < timedelta(minutes=6)  # the pull's start, less the skew margin
    late = demo_customers(1, datetime.now(timezone.utc) - timedelta(minutes=1))
    late[0]["id"] += 5_000
    await seed(http, shop, late)
    again = await puller(shop).pull("customers")
    assert again.records == 1  # only what changed since the last pull began


async def test_a_restarted_pull_resumes_from_its_cursor(shop, http, pull_env):
    puller, checkpoints, queued = pull_env
    seeded = demo_customers(70, datetime(2022, 1, 1, tzinfo=timezone.utc))
    await seed(http, shop, seeded)
    first = await puller(shop, page_size=20).pull("customers", since="2022-01-01T00:00:00+00:00", max_pages=2)
    assert first.records == 40
    assert (await checkpoints.get("shopify:customers"))["cursor"]
    rest = await puller(shop, page_size=20).pull("customers")  # a new process: from the stored cursor
    ids = [m["delivery_id"] for m in queued()]
    assert len(ids) == len(set(ids)) == first.records + rest.records  # nothing twice, nothing skipped
    assert {f"pull:customers:{c['id']}:{c['updated_at']}" for c in seeded} <= set(ids)


async def test_pull_stays_inside_the_leaky_bucket(shop, http, pull_env):
    puller, _, queued = pull_env
    seeded = demo_customers(90, datetime(2023, 1, 1, tzinfo=timezone.utc))
    await seed(http, shop, seeded)
    async with http.get(f"{shop}/_sandbox/stats") as r:
        before = await r.json()
    result = await puller(shop, page_size=5).pull("customers", since="2023-01-01T00:00:00+00:00")
    async with http.get(f"{shop}/_sandbox/stats") as r:
        after = await r.json()
    ids = {m["delivery_id"] for m in queued()}
    assert result.records == len(ids) and {f"pull:customers:{c['id']}:{c['updated_at']}" for c in seeded} <= ids
    assert after["requests"] - before["requests"] >= 18
    # Pacing by X-Shopify-Shop-Api-Call-Limit keeps 429s rare; any that happen are waited out, not lost.
    assert after["throttled"] - before["throttled"] <= 2


async def test_pulled_records_reach_profiles_and_dedupe_against_webhooks(shop, http, system, receiver):
    email = f"pulled-{uuid.uuid4().hex[:8]}@example.com"
    record = {"id": 9_100_000_000_001, "admin_graphql_api_id": "gid://shopify/Customer/9100000000001", "email": email,
              "first_name": "Polly", "last_name": "Pull", "updated_at": "2024-08-01T10:00:00+00:00",
              "created_at": "2024-08-01T10:00:00+00:00", "tags": ""}
    await seed(http, shop, [record])
    env = {**system.env, "MERGETAG_SHOPIFY_ADMIN_URL": f"{shop}/admin/api/{API_VERSION}", "MERGETAG_SHOPIFY_ADMIN_TOKEN": TOKEN}
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "adapters.cli", "pull", "shopify", "--resource", "customers",
                                                   "--since", "2024-08-01T10:00:00+00:00", "--json"],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.splitlines()[-1])["records"] >= 1

    async def merged():
        return await system.db.profiles.find_one({"email": email})

    doc = await eventually(merged)
    assert doc["traits"]["first_name"]["value"] == "Polly"
    # The same content by webhook names the same event: no new version.
    assert (await post_webhook(http, receiver, "customers/update", record)).status == 202
    await asyncio.sleep(1.5)
    assert (await system.db.profiles.find_one({"email": email}))["version"] == doc["version"]
