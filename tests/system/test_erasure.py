"""Erased stays erased and unsubscribed stays unsubscribed, on the real pipeline and all three ESPs.

Every test is named after the guarantee it proves; each talks to the real receiver, RabbitMQ, the
worker and sync processes, SecantusDB and the ESP sandboxes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from typing import Any
from unittest import mock

import aiohttp
from aiohttp.test_utils import TestServer

from adapters.http.admin import create_admin_app
from adapters.settings import Settings
from sandboxes.local import free_port
from tests.conftest import (
    API_KEY,
    ROOT,
    SENDGRID_API_KEY,
    SENDGRID_CUSTOM_FIELDS,
    WRITE_KEY,
    eventually,
    index_key,
    own_pipeline,
    post_webhook,
    start_mailchimp,
    start_sandbox,
    stop_sandbox,
)
from tests.support.samples import customer, customer_gid, order

TARGETS = ("mailchimp", "klaviyo", "sendgrid")


def unique(tag: str = "er") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


def redact(email: str, cid: int | None = None, phone: str | None = None) -> dict[str, Any]:
    return {"shop_id": 1, "shop_domain": "test.myshopify.com", "orders_to_redact": [],
            "customer": {"id": cid if cid is not None else customer_gid(email), "email": email, "phone": phone}}


def receipt_id(system, cid: int) -> str:
    return system.settings.hasher().erasure_id(f"shopify:redact:{cid}")


async def receipt(system, rid: str) -> dict[str, Any] | None:
    return await system.db.erasures.find_one({"_id": rid})


async def completed(system, rid: str) -> dict[str, Any] | None:
    found = await receipt(system, rid)
    targets = (found or {}).get("targets") or {}
    return found if set(targets) == set(TARGETS) and all(t["status"] == "verified" for t in targets.values()) else None


async def held_anywhere(http, email: str, sandbox, klaviyo_sandbox, sendgrid_sandbox) -> dict[str, Any]:
    """What each ESP sandbox holds for ``email`` (only those that hold something)."""
    found = {"mailchimp": await sandbox.member(http, email),
             "klaviyo": next((r for r in await klaviyo_sandbox.control(http, "profiles") if r.get("email") == email), None),
             "sendgrid": next((c for c in (await sendgrid_sandbox.control(http, "contacts"))["contacts"] if c.get("email") == email), None)}
    return {name: held for name, held in found.items() if held}


async def everything_of(system, *needles: str) -> list[str]:
    """Every document of every collection of the system's database that spells out one of ``needles``."""
    hits = []
    for name in await system.db.list_collection_names():
        async for doc in system.db[name].find():
            text = json.dumps(doc, default=str)
            hits += [f"{name}/{doc['_id']}" for needle in needles if needle in text]
    return hits


async def track(http, receiver, call: str, body: dict[str, Any]) -> None:
    async with http.post(f"{receiver}/v1/{call}", json=body, headers={"Authorization": aiohttp.encode_basic_auth(WRITE_KEY, "")}) as r:
        assert r.status == 200, await r.text()


async def synced_everywhere(http, email, sandbox, klaviyo_sandbox, sendgrid_sandbox) -> None:
    async def there():
        return len(await held_anywhere(http, email, sandbox, klaviyo_sandbox, sendgrid_sandbox)) == 3

    await eventually(there, timeout=45)


def cli(env: dict[str, str], *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "adapters.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


async def test_a_redact_for_someone_never_seen_keeps_every_later_event_out(receiver, system, sandbox, klaviyo_sandbox, sendgrid_sandbox, http):
    email, other = unique(), unique("other")
    cid = customer_gid(email)
    assert (await post_webhook(http, receiver, "customers/redact", redact(email, cid, phone="+1 555 000 1111"))).status == 202
    rid = receipt_id(system, cid)
    done = await eventually(lambda: completed(system, rid), timeout=45)
    assert done["requested_by"] == "shopify" and len(done["profile_ids"]) == 1

    # Later events for the same person, by Shopify id (with another address), by email, by phone, by tracking API.
    moved = dict(customer(email, first_name="Back", updated_at="2031-01-01T00:00:00Z"), email=other)
    assert (await post_webhook(http, receiver, "customers/update", moved)).status == 202
    assert (await post_webhook(http, receiver, "orders/create", order(email, processed_at="2019-01-01T00:00:00Z"))).status == 202
    await track(http, receiver, "identify", {"userId": f"u-{uuid.uuid4().hex[:6]}", "traits": {"email": email, "phone": "+15550001111"},
                                             "timestamp": "2031-02-01T00:00:00Z"})

    async def dropped():
        found = await receipt(system, rid)
        return found if found.get("late_events", 0) >= 3 else None

    await eventually(dropped, timeout=60)
    keys = [f"email:{email}", f"email:{other}", f"shopify:{cid}", "phone:+15550001111"]
    assert await system.db.profiles.count_documents({"keys": {"$in": [index_key(k) for k in keys]}, "erased": None}) == 0
    assert await everything_of(system, email, other, "Back", str(cid)) == []
    for address in (email, other):
        assert await held_anywhere(http, address, sandbox, klaviyo_sandbox, sendgrid_sandbox) == {}


async def test_any_number_of_erasures_of_unseen_people_coexist_and_each_deletes_at_every_esp(
        receiver, system, sandbox, klaviyo_sandbox, sendgrid_sandbox, http):
    people = [unique("unseen") for _ in range(3)]
    # The first one is at every ESP already (imported there by someone else): mergetag never saw them.
    async with http.put(f"{sandbox.api}/lists/sandbox/members/{people[0]}", json={"email_address": people[0], "status_if_new": "subscribed"},
                        headers={"Authorization": aiohttp.encode_basic_auth("t", API_KEY)}) as r:
        assert r.status == 200
    for email in people:
        assert (await post_webhook(http, receiver, "customers/redact", redact(email))).status == 202
    # The same redact again (Shopify retries with a new delivery id): no second receipt, no collision.
    assert (await post_webhook(http, receiver, "customers/redact", redact(people[1]))).status == 202
    receipts = [await eventually(lambda rid=receipt_id(system, customer_gid(e)): completed(system, rid), timeout=45) for e in people]
    tombs = {r["profile_ids"][0] for r in receipts}
    assert len(tombs) == 3 and await system.db.erasures.count_documents({"_id": {"$in": [r["_id"] for r in receipts]}}) == 3
    assert await sandbox.member(http, people[0]) is None
    assert await system.db.profiles.count_documents({"_id": {"$in": list(tombs)}, "erased": {"$ne": None}}) == 3
    assert await everything_of(system, *people) == []


async def test_late_events_for_an_erased_person_are_dropped_and_counted_never_dead_lettered(
        receiver, system, sandbox, klaviyo_sandbox, sendgrid_sandbox, http):
    email = unique("late")
    assert (await post_webhook(http, receiver, "customers/create", customer(email, first_name="Lata"))).status == 202
    await synced_everywhere(http, email, sandbox, klaviyo_sandbox, sendgrid_sandbox)
    assert (await post_webhook(http, receiver, "customers/redact", redact(email))).status == 202
    rid = receipt_id(system, customer_gid(email))
    await eventually(lambda: completed(system, rid), timeout=45)
    late = [post_webhook(http, receiver, "orders/create", order(email, order_gid=10**15 + n, processed_at=f"20{10 + n}-01-01T00:00:00Z"))
            for n in range(8)]
    late += [post_webhook(http, receiver, "customers/update", customer(email, first_name=f"L{n}", updated_at=f"2040-01-0{n + 1}T00:00:00Z"))
             for n in range(4)]
    assert {r.status for r in await asyncio.gather(*late)} == {202}

    async def counted():
        found = await receipt(system, rid)
        return found if found.get("late_events", 0) >= 12 else None

    await eventually(counted, timeout=45)
    letters = await asyncio.to_thread(cli, system.env, "dlq", "list", "--queue", "events", "--json")
    assert [d for d in letters if d["error"] == "write_contention"] == []
    assert await everything_of(system, email, "Lata") == []
    assert await held_anywhere(http, email, sandbox, klaviyo_sandbox, sendgrid_sandbox) == {}


async def test_erasing_a_merged_profile_empties_every_absorbed_document(receiver, system, sandbox, klaviyo_sandbox, sendgrid_sandbox, http):
    old, new = unique("absorbed"), unique("survivor")
    shop = customer(old, first_name="Merla")
    assert (await post_webhook(http, receiver, "customers/create", shop)).status == 202
    await track(http, receiver, "identify", {"userId": f"u-{uuid.uuid4().hex[:8]}", "traits": {"email": new, "last_name": "Twofold"},
                                             "timestamp": "2025-02-01T00:00:00Z"})
    await eventually(lambda: system.db.profiles.find_one({"keys": index_key(f"email:{new}")}))
    # Shopify now reports its customer under the new address: the two profiles merge.
    assert (await post_webhook(http, receiver, "customers/update", dict(shop, email=new, updated_at="2025-03-01T00:00:00Z"))).status == 202

    async def merged():
        doc = await system.db.profiles.find_one({"keys": index_key(f"email:{old}")})
        return doc if doc and doc.get("merged_from") else None

    survivor = await eventually(merged, timeout=60)
    absorbed_id = survivor["merged_from"][0]
    assert (await system.db.profiles.find_one({"_id": absorbed_id}))["merged_into"] == survivor["_id"]
    assert (await post_webhook(http, receiver, "customers/redact", redact(new, customer_gid(old)))).status == 202
    await eventually(lambda: completed(system, receipt_id(system, customer_gid(old))), timeout=45)

    pointer = await system.db.profiles.find_one({"_id": absorbed_id})
    assert set(pointer) == {"_id", "merged_into", "keys", "merged_at", "version"}
    assert await everything_of(system, old, new, "Merla", "Twofold") == []
    for address in (old, new):
        assert await held_anywhere(http, address, sandbox, klaviyo_sandbox, sendgrid_sandbox) == {}


async def test_an_email_change_retires_the_old_address_at_every_esp(receiver, system, sandbox, klaviyo_sandbox, sendgrid_sandbox, http):
    old, new = unique("was"), unique("now")
    body = customer(old, first_name="Mova")
    assert (await post_webhook(http, receiver, "customers/create", body)).status == 202
    await synced_everywhere(http, old, sandbox, klaviyo_sandbox, sendgrid_sandbox)
    assert (await post_webhook(http, receiver, "customers/update", dict(body, email=new, updated_at="2025-06-01T00:00:00Z"))).status == 202
    await synced_everywhere(http, new, sandbox, klaviyo_sandbox, sendgrid_sandbox)

    async def retired():
        held = await held_anywhere(http, old, sandbox, klaviyo_sandbox, sendgrid_sandbox)
        archived = (held.get("mailchimp") or {}).get("status") == "archived"
        klaviyo = held.get("klaviyo", {}).get("subscriptions", {}).get("email", {}).get("marketing", {}).get("consent")
        return held if archived and klaviyo == "UNSUBSCRIBED" and "sendgrid" not in held else None

    try:
        await eventually(retired, timeout=45)
    except AssertionError:
        doc = await system.db.profiles.find_one({"keys": index_key(f"email:{new}")})
        raise AssertionError(json.dumps([await held_anywhere(http, old, sandbox, klaviyo_sandbox, sendgrid_sandbox), doc["esp"]], default=str))
    assert (await sandbox.member(http, new))["status"] != "archived"


async def test_an_unsubscribe_reaches_every_address_the_person_had_at_every_esp(receiver, system, sandbox, klaviyo_sandbox,
                                                                               sendgrid_sandbox, http):
    first, second = unique("first"), unique("second")
    body = customer(first, first_name="Uno")
    assert (await post_webhook(http, receiver, "customers/create", body)).status == 202
    await synced_everywhere(http, first, sandbox, klaviyo_sandbox, sendgrid_sandbox)
    assert (await post_webhook(http, receiver, "customers/update", dict(body, email=second, updated_at="2025-06-01T00:00:00Z"))).status == 202
    await synced_everywhere(http, second, sandbox, klaviyo_sandbox, sendgrid_sandbox)
    leave = {"customer_id": customer_gid(first), "email_address": second,
             "email_marketing_consent": {"state": "unsubscribed", "consent_updated_at": "2025-07-01T00:00:00Z"}}
    assert (await post_webhook(http, receiver, "customers_email_marketing_consent/update", leave)).status == 202

    async def everywhere_unsubscribed():
        suppressed = set((await sendgrid_sandbox.control(http, "contacts"))["suppressions"])
        for address in (first, second):
            held = await held_anywhere(http, address, sandbox, klaviyo_sandbox, sendgrid_sandbox)
            klaviyo = held.get("klaviyo", {}).get("subscriptions", {}).get("email", {}).get("marketing", {}).get("consent")
            if (held.get("mailchimp") or {}).get("status") != "unsubscribed" or klaviyo != "UNSUBSCRIBED" or address not in suppressed:
                return None
        return True

    await eventually(everywhere_unsubscribed, timeout=45)
    # A later profile update that still says "accepts marketing" resubscribes no address, anywhere.
    stale = dict(body, email=second, first_name="Again", updated_at="2025-08-01T00:00:00Z", accepts_marketing=True,
                 accepts_marketing_updated_at="2024-01-01T00:00:00Z")
    assert (await post_webhook(http, receiver, "customers/update", stale)).status == 202

    async def renamed():
        member = await sandbox.member(http, second)
        return member if member["merge_fields"].get("FNAME") == "Again" else None

    assert (await eventually(renamed, timeout=60))["status"] == "unsubscribed"
    assert (await sandbox.member(http, first))["status"] == "unsubscribed"
    assert (await klaviyo_sandbox.control(http, "stats"))["resubscribe_refused"] == 0


async def test_an_operators_erasure_deletes_every_address_the_person_had_and_reads_back(receiver, system, sandbox, klaviyo_sandbox,
                                                                                      sendgrid_sandbox, http):
    first, second = unique("op1"), unique("op2")
    body = customer(first, first_name="Opal")
    assert (await post_webhook(http, receiver, "customers/create", body)).status == 202
    await synced_everywhere(http, first, sandbox, klaviyo_sandbox, sendgrid_sandbox)
    assert (await post_webhook(http, receiver, "customers/update", dict(body, email=second, updated_at="2025-06-01T00:00:00Z"))).status == 202
    await synced_everywhere(http, second, sandbox, klaviyo_sandbox, sendgrid_sandbox)

    asked = await asyncio.to_thread(cli, system.env, "erase", "--id", f"shopify:{customer_gid(first)}")
    assert asked["status"] == "requested" and asked["id"].startswith("er_")

    last: list[Any] = []

    async def finished():
        shown = await asyncio.to_thread(cli, system.env, "erase", "status", asked["id"])
        last[:] = [shown]
        return shown if shown["status"] == "completed" else None

    try:
        shown = await eventually(finished, timeout=60)
    except AssertionError:
        raise AssertionError(json.dumps(last)) from None
    assert set(shown["targets"]) == set(TARGETS)
    assert all(t["status"] == "verified" and t["at"] and t["addresses"] == 2 for t in shown["targets"].values())
    assert shown["requested_by"].startswith("cli:") and all(k.startswith("h:") for k in shown["identifiers"])
    assert first not in json.dumps(shown) and str(customer_gid(first)) not in json.dumps(shown)
    for address in (first, second):
        assert await held_anywhere(http, address, sandbox, klaviyo_sandbox, sendgrid_sandbox) == {}
    assert await everything_of(system, first, second, "Opal") == []


async def test_the_admin_api_erases_only_with_the_erase_scope(receiver, system, sandbox, http):
    email = unique("admin")
    tokens = {"viewer": {"token": "read-only-token", "scopes": ["read"]}, "dpo": {"token": "erasing-token", "scopes": ["read", "erase"]}}
    with mock.patch.dict(os.environ, {**system.env, "MERGETAG_ADMIN_TOKENS": json.dumps(tokens)}, clear=True):
        app = create_admin_app(Settings())
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    try:
        request = {"emails": [email], "ids": [f"shopify:{customer_gid(email)}"]}
        async with http.post(f"{base}/admin/erasures", json=request, headers={"Authorization": "Bearer read-only-token"}) as r:
            assert r.status == 403 and (await r.json())["error"] == "forbidden"
        async with http.post(f"{base}/admin/erasures", json=request, headers={"Authorization": "Bearer nobody"}) as r:
            assert r.status == 401
        async with http.post(f"{base}/admin/erasures", json={"emails": ["not an address"]}, headers={"Authorization": "Bearer erasing-token"}) as r:
            assert r.status == 400 and (await r.json())["error"] == "invalid_identifiers"
        async with http.post(f"{base}/admin/erasures", json=request, headers={"Authorization": "Bearer erasing-token"}) as r:
            assert r.status == 202
            asked = await r.json()

        async def shown():
            async with http.get(f"{base}{asked['receipt']}", headers={"Authorization": "Bearer read-only-token"}) as r:
                body = await r.json()
                return body if r.status == 200 and body["status"] == "completed" else None

        body = await eventually(shown, timeout=45)
        assert body["requested_by"] == "admin:dpo" and email not in json.dumps(body)
    finally:
        await server.close()


async def test_a_target_that_refuses_an_erasure_shows_failed_and_is_retried_until_it_works(mongo_uri, tmp_path, http):
    mailchimp = start_mailchimp()
    try:
        async with own_pipeline(mongo_uri, mailchimp, tmp_path, MERGETAG_SYNC_LEASE_S="1", MERGETAG_SYNC_SWEEP_INTERVAL_S="0.3",
                                MERGETAG_SYNC_GRACE_S="1") as pipeline:
            pipeline.start_sync()
            email = unique("refused")
            assert (await post_webhook(http, pipeline.url, "customers/create", customer(email))).status == 202
            await eventually(lambda: mailchimp.member(http, email), timeout=45)
            await mailchimp.control(http, "faults", {"status": 400, "count": 10_000})
            assert (await post_webhook(http, pipeline.url, "customers/redact", redact(email))).status == 202
            with mock.patch.dict(os.environ, pipeline.env, clear=True):
                rid = Settings().hasher().erasure_id(f"shopify:redact:{customer_gid(email)}")

            async def failed():
                found = await pipeline.db.erasures.find_one({"_id": rid})
                target = ((found or {}).get("targets") or {}).get("mailchimp") or {}
                return target if target.get("status") == "failed" else None

            target = await eventually(failed, timeout=45)
            assert target["reason"] == "esp_rejected" and target["at"]

            async def retried():
                stats = await mailchimp.control(http, "stats")
                return sum(n for route, n in stats["requests"].items() if "delete-permanent" in route) >= 3

            await eventually(retried, timeout=45)
            assert await mailchimp.member(http, email) is not None  # not deleted yet, and not forgotten about
            await mailchimp.control(http, "faults", {"clear": True})

            async def verified():
                found = await pipeline.db.erasures.find_one({"_id": rid})
                return found if found["targets"]["mailchimp"]["status"] == "verified" else None

            await eventually(verified, timeout=45)
            assert await mailchimp.member(http, email) is None
    finally:
        stop_sandbox(mailchimp)


async def test_a_bulk_job_still_in_flight_cannot_land_after_the_erasure(mongo_uri, tmp_path, http):
    sendgrid = start_sandbox("sendgrid", "--api-key", SENDGRID_API_KEY, "--job-delay-ms", "200",
                             "--custom-fields", SENDGRID_CUSTOM_FIELDS)
    # Short timeouts, so the import job below outlives both the send's wait for it and the send's lease.
    esp_file = tmp_path / "esps.json"
    esp_file.write_text(json.dumps({"sendgrid": {"kind": "sendgrid", "base_url": sendgrid.url, "api_key": SENDGRID_API_KEY,
                                                 "fields": {"first_name": "first_name"}, "timeout_s": 1, "job_timeout_s": 1}}))
    try:
        async with own_pipeline(mongo_uri, None, tmp_path, MERGETAG_ESP_FILE=str(esp_file), MERGETAG_SYNC_LEASE_S="1",
                                MERGETAG_SYNC_SWEEP_INTERVAL_S="0.3", MERGETAG_SYNC_GRACE_S="1") as pipeline:
            pipeline.start_sync()
            email = unique("inflight")
            await sendgrid.control(http, "job-delay", {"ms": 12_000})
            assert (await post_webhook(http, pipeline.url, "customers/create", customer(email, first_name="Jobe"))).status == 202

            async def job_running():
                return (await sendgrid.control(http, "stats"))["jobs_running"] >= 1

            await eventually(job_running, timeout=60)
            await sendgrid.control(http, "job-delay", {"ms": 200})
            assert (await post_webhook(http, pipeline.url, "customers/redact", redact(email))).status == 202
            with mock.patch.dict(os.environ, pipeline.env, clear=True):
                rid = Settings().hasher().erasure_id(f"shopify:redact:{customer_gid(email)}")

            async def done():
                found = await pipeline.db.erasures.find_one({"_id": rid})
                running = (await sendgrid.control(http, "stats"))["jobs_running"]
                return found if not running and found and found["targets"]["sendgrid"]["status"] == "verified" else None

            await eventually(done, timeout=90)
            # The job did land (the contact was written), and the deletion came after it: nothing is left.
            assert [e for _, e, _ in await sendgrid.control(http, "history") if e == email]
            assert [c for c in (await sendgrid.control(http, "contacts"))["contacts"] if c.get("email") == email] == []
    finally:
        stop_sandbox(sendgrid)


async def test_an_erasure_removes_the_dead_letters_that_carry_the_person(receiver, system, sandbox, klaviyo_sandbox, sendgrid_sandbox, http):
    from datetime import datetime, timezone

    from broker import topology
    from broker.publisher import Publisher, publish_delivery
    from schemas.delivery import Delivery

    email, bystander = unique("lettered"), unique("bystander")
    queue = topology.events_queue(system.settings.queue_prefix)
    publisher = Publisher(system.settings.amqp_url, [queue], 5)
    ids = []
    for who in (email, bystander):  # deliveries nothing maps (permanent failures): dead letters with the whole payload
        ghost = Delivery(source="ghost", topic="x", delivery_id=uuid.uuid4().hex, received_at=datetime.now(timezone.utc),
                         payload={"contact": {"email": who}, "first_name": "Dora"})
        ids.append(await publish_delivery(publisher, queue, ghost))
    await publisher.close()

    async def lettered(wanted=set(ids)):
        letters = await asyncio.to_thread(cli, system.env, "dlq", "list", "--queue", "events", "--json")
        return wanted <= {d["message_id"] for d in letters}

    await eventually(lettered, timeout=60)
    assert (await post_webhook(http, receiver, "customers/redact", redact(email))).status == 202
    rid = receipt_id(system, customer_gid(email))
    done = await eventually(lambda: completed(system, rid), timeout=45)

    async def removed():
        found = await receipt(system, rid)
        return found if (found.get("removed") or {}).get("dead_letters") == 1 else None

    await eventually(removed, timeout=60)
    letters = {d["message_id"] for d in await asyncio.to_thread(cli, system.env, "dlq", "list", "--queue", "events", "--json")}
    assert ids[0] not in letters and ids[1] in letters  # the bystander's letter stays for the operator
    assert done["profile_ids"]


async def test_an_erasure_covers_every_profile_that_names_the_person(receiver, system, sandbox, klaviyo_sandbox, sendgrid_sandbox, http):
    email, anonymous = unique("split"), f"anon-{uuid.uuid4().hex[:10]}"
    assert (await post_webhook(http, receiver, "customers/create", customer(email, first_name="Sola"))).status == 202
    await track(http, receiver, "page", {"anonymousId": anonymous, "timestamp": "2025-01-01T00:00:00Z", "context": {"timezone": "Asia/Tokyo"}})
    for key in (f"email:{email}", f"anonymous:{anonymous}"):
        await eventually(lambda key=key: system.db.profiles.find_one({"keys": index_key(key)}), timeout=60)
    env = system.env
    asked = await asyncio.to_thread(cli, env, "erase", "--email", email, "--id", f"anonymous:{anonymous}")

    async def finished():
        shown = await asyncio.to_thread(cli, env, "erase", "status", asked["id"])
        return shown if shown["status"] == "completed" else None

    shown = await eventually(finished, timeout=60)
    assert len(shown["profiles"]) == 1  # one tombstone for the two profiles that named them
    keys = [index_key(f"email:{email}"), index_key(f"anonymous:{anonymous}")]
    assert await system.db.profiles.count_documents({"keys": {"$in": keys}, "erased": None}) == 0
    assert await everything_of(system, email, anonymous, "Sola") == []



async def test_an_erasure_removes_the_quarantined_deliveries_that_name_the_person(receiver, system, http):
    email = unique("quarantined")
    # An order the canonical schema refuses (a total that is no amount): quarantined, kept whole, email and all.
    await track(http, receiver, "track", {"userId": f"u-{uuid.uuid4().hex[:8]}", "event": "Order Completed",
                                          "properties": {"order_id": "Q-1", "total": "lots", "email": email}})

    async def quarantined():
        return [d async for d in system.db.quarantine.find({"keys": index_key(f"email:{email}")})]

    assert len(await eventually(quarantined, timeout=60)) == 1
    assert (await post_webhook(http, receiver, "customers/redact", redact(email))).status == 202
    rid = receipt_id(system, customer_gid(email))

    async def removed():
        found = await receipt(system, rid)
        return found if found and (found.get("removed") or {}).get("quarantined") == 1 else None

    await eventually(removed, timeout=45)
    await eventually(lambda: completed(system, rid), timeout=45)
    assert await everything_of(system, email) == []
