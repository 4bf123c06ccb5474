"""One pipeline, three ESPs: every change reaches Mailchimp, Klaviyo and SendGrid (their sandboxes, as
configured by the system's ESP file); consent and backlogs behave the same at each."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any
from unittest import mock

from adapters.esps.registry import build_esp
from adapters.settings import Settings
from adapters.store.profiles import ProfileStore
from broker import topology
from broker.publisher import Publisher, encode_message
from schemas.profile import Profile, Trait
from tests.conftest import AMQP_URL, ESP_KEYS, HASHER, ROOT, SENDGRID_LIST_ID, Pipeline, esp_targets, eventually, own_pipeline, post_webhook
from tests.support.samples import customer, customer_gid, order
from workers.sync import policy


async def klaviyo_profile(http, klaviyo_sandbox, email: str) -> dict[str, Any] | None:
    rows = await klaviyo_sandbox.control(http, "profiles")
    return next((r for r in rows if r.get("email") == email), None)


async def sendgrid_contact(http, sendgrid_sandbox, email: str) -> dict[str, Any] | None:
    listing = await sendgrid_sandbox.control(http, "contacts")
    return next((c for c in listing["contacts"] if c.get("email") == email), None)


async def writes_for(http, email: str, *sandboxes) -> list[int]:
    """How many times each sandbox wrote this contact."""
    return [sum(1 for _, e, _ in await s.control(http, "history") if e == email) for s in sandboxes]


async def test_a_customer_reaches_all_three_and_an_unsubscribe_follows(receiver, system, sandbox, klaviyo_sandbox, sendgrid_sandbox,
                                                                       http):
    email = f"three-{uuid.uuid4().hex[:8]}@example.com"
    assert (await post_webhook(http, receiver, "customers/create", customer(email, first_name="Tess"))).status == 202
    assert (await post_webhook(http, receiver, "orders/paid", order(email, total="120.00",
                                                                    order_gid=int(uuid.uuid4().int % 10**15)))).status == 202

    async def everywhere():
        mc = await sandbox.member(http, email)
        kl = await klaviyo_profile(http, klaviyo_sandbox, email)
        sg = await sendgrid_contact(http, sendgrid_sandbox, email)
        ready = (mc and mc["merge_fields"].get("LTV") == 120.0 and kl and kl["properties"].get("lifetime_value") == 120.0
                 and sg and sg["custom_fields"].get("ltv") == 120.0)
        return (mc, kl, sg) if ready else None

    mc, kl, sg = await eventually(everywhere, timeout=60)
    assert mc["merge_fields"]["FNAME"] == "Tess" and kl["first_name"] == "Tess" and sg["first_name"] == "Tess"
    assert kl["properties"]["order_count"] == 1 and sg["custom_fields"]["orders"] == 1
    assert SENDGRID_LIST_ID in sg["list_ids"]

    # The same facts again (a new delivery, so the receiver's de-duplication does not catch it) change
    # nothing; a real change after them does. Each ESP hears exactly once more about this customer.
    async def settled(first_name: str):
        """The profile holds ``first_name`` and no target has anything pending or in flight for it."""
        doc = await system.db.profiles.find_one({"email": email})
        if not doc or doc["traits"]["first_name"]["value"] != first_name:
            return None
        states = [doc["esp"][n] for n in ("mailchimp", "klaviyo", "sendgrid")]
        return doc if all(not s["pending"] and s.get("sending_until") is None for s in states) else None

    await eventually(lambda: settled("Tess"), timeout=60)
    before = await writes_for(http, email, sandbox, klaviyo_sandbox, sendgrid_sandbox)
    assert (await post_webhook(http, receiver, "customers/update", customer(email, first_name="Tess"))).status == 202
    assert (await post_webhook(http, receiver, "customers/update", customer(email, first_name="Tessa",
                                                                            updated_at="2024-02-01T10:00:00-05:00"))).status == 202

    async def renamed():
        now = await writes_for(http, email, sandbox, klaviyo_sandbox, sendgrid_sandbox)
        return now if all(n > b for n, b in zip(now, before)) else None

    await eventually(renamed, timeout=60)
    await eventually(lambda: settled("Tessa"), timeout=60)  # any straggler has been sent by now
    assert await writes_for(http, email, sandbox, klaviyo_sandbox, sendgrid_sandbox) == [b + 1 for b in before]
    assert (await klaviyo_profile(http, klaviyo_sandbox, email))["first_name"] == "Tessa"

    unsubscribe = {"customer_id": customer_gid(email), "email_address": email,
                   "email_marketing_consent": {"state": "unsubscribed", "consent_updated_at": "2031-01-01T00:00:00Z"}}
    assert (await post_webhook(http, receiver, "customers_email_marketing_consent/update", unsubscribe)).status == 202

    async def unsubscribed_everywhere():
        mc = await sandbox.member(http, email)
        kl = await klaviyo_profile(http, klaviyo_sandbox, email)
        sg = await sendgrid_contact(http, sendgrid_sandbox, email)
        consent = kl["subscriptions"]["email"]["marketing"]["consent"]
        return mc["status"] == "unsubscribed" and consent == "UNSUBSCRIBED" and sg["suppressed"]

    await eventually(unsubscribed_everywhere, timeout=60)
    stats = await klaviyo_sandbox.control(http, "stats")
    assert stats["resubscribe_refused"] == 0  # mergetag never even asked


@asynccontextmanager
async def bulk_pipeline(mongo_uri, sandbox, klaviyo_sandbox, sendgrid_sandbox, tmp_path,
                        **settings: str) -> AsyncIterator[tuple[Pipeline, ProfileStore]]:
    """A pipeline of its own on the three sandboxes, with a grace long enough that the sweeper never
    steps in before the batch a test publishes by hand runs."""
    esp_file = tmp_path / "esps.json"
    esp_file.write_text(json.dumps(esp_targets(sandbox, klaviyo_sandbox, sendgrid_sandbox)))
    async with own_pipeline(mongo_uri, None, tmp_path, MERGETAG_ESP_FILE=str(esp_file), MERGETAG_SYNC_GRACE_S="30", **ESP_KEYS,
                            **settings) as pipeline:
        pipeline.start_sync()
        store = ProfileStore.connect(mongo_uri, pipeline.env["MERGETAG_MONGODB_DATABASE"], HASHER)
        try:
            yield pipeline, store
        finally:
            await store.close()


def clients_of(pipeline: Pipeline, names: tuple[str, ...]) -> dict[str, Any]:
    with mock.patch.dict(os.environ, pipeline.env, clear=True):
        targets = Settings().esp_targets()
    return {name: build_esp(name, targets[name]) for name in names}


async def publish_batch(pipeline: Pipeline, ids: list[str], esp: str) -> None:
    queue = topology.sync_queue(pipeline.env["MERGETAG_QUEUE_PREFIX"])
    publisher = Publisher(AMQP_URL, [queue], 5)
    message_id, body = encode_message(queue, topology.SYNC_BATCH_ACTOR, (ids, esp))
    await publisher.publish(queue, body, message_id)
    await publisher.close()


async def test_backlogs_go_in_bulk_jobs_and_refused_items_are_dead_lettered_alone(mongo_uri, sandbox, klaviyo_sandbox, sendgrid_sandbox,
                                                                                 http, tmp_path):
    async with bulk_pipeline(mongo_uri, sandbox, klaviyo_sandbox, sendgrid_sandbox, tmp_path) as (pipeline, store):
        await backlogs_go_in_bulk_jobs(pipeline, store, klaviyo_sandbox, sendgrid_sandbox, http)


async def backlogs_go_in_bulk_jobs(pipeline: Pipeline, store: ProfileStore, klaviyo_sandbox, sendgrid_sandbox, http) -> None:
    clients = clients_of(pipeline, ("klaviyo", "sendgrid"))
    tag = uuid.uuid4().hex[:8]
    good = [f"bulk{n}-{tag}@example.com" for n in range(24)]
    bad = [f"bulk-bad{n}-{tag}@example" for n in range(2)]  # no top-level domain: both ESPs refuse these
    ids = []
    for email in good + bad:
        profile = Profile(id=f"p_bulk_{uuid.uuid4().hex}", email=email)
        members = {name: (member := client.member(profile), _hash(member)) for name, client in clients.items()}
        assert await store.save(profile, None, members)
        ids.append(profile.id)
    for s in (klaviyo_sandbox, sendgrid_sandbox):
        await s.control(http, "stats/reset", {})

    for name in clients:
        await publish_batch(pipeline, ids, name)

    async def settled():
        docs = [d async for d in pipeline.db.profiles.find({"_id": {"$in": ids}})]
        done = all(not d["esp"][n]["pending"] or d["esp"][n].get("failed_code") for d in docs for n in clients)
        return docs if done else None

    docs = await eventually(settled, timeout=60)
    by_email = {d["email"]: d["esp"] for d in docs}
    for name in clients:
        assert all(by_email[e][name]["sent_hash"] == by_email[e][name]["member_hash"] for e in good), name
        assert all(by_email[e][name]["failed_code"] == "esp_rejected" and "sent_hash" not in by_email[e][name] for e in bad), name
    kl_stats = await klaviyo_sandbox.control(http, "stats")
    sg_stats = await sendgrid_sandbox.control(http, "stats")
    assert kl_stats["requests"].get("POST /api/profile-bulk-import-jobs", 0) == 1  # one bulk job each
    assert kl_stats["requests"].get("POST /api/profile-import", 0) == 0
    assert sg_stats["requests"].get("PUT /v3/marketing/contacts", 0) == 1
    assert await klaviyo_profile(http, klaviyo_sandbox, good[0]) is not None
    assert await sendgrid_contact(http, sendgrid_sandbox, good[-1]) is not None

    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "adapters.cli", "dlq", "list", "--queue", "sync", "--json"],
                                  cwd=ROOT, env=pipeline.env, capture_output=True, text=True, timeout=60, check=True)
    bad_ids = {d["_id"] for d in docs if d["email"] in bad}
    letters = [d for d in json.loads(out.stdout) if d.get("profile_id") in bad_ids and d["error"] == "esp_rejected"]
    assert sorted((d["profile_id"], d["esp"]) for d in letters) == sorted((pid, name) for pid in bad_ids for name in clients)
    assert all(d["detail"].startswith(d["esp"]) and "@example" not in d["detail"] for d in letters)
    for client in clients.values():
        await client.close()


def _hash(member: dict[str, Any] | None) -> str | None:
    from adapters.esps.base import member_hash

    return member_hash(member) if member is not None else None


async def test_a_bulk_request_refused_whole_is_split_so_the_good_ones_still_go(mongo_uri, sandbox, klaviyo_sandbox, sendgrid_sandbox,
                                                                             http, tmp_path):
    """The ESP refuses a whole bulk request (a 400 naming one contact): the members go one by one,
    the good ones arrive and nothing waits for the bad one."""
    async with bulk_pipeline(mongo_uri, sandbox, klaviyo_sandbox, sendgrid_sandbox, tmp_path) as (pipeline, store):
        await refused_whole_is_split(pipeline, store, sendgrid_sandbox, http)


async def refused_whole_is_split(pipeline: Pipeline, store: ProfileStore, sendgrid_sandbox, http) -> None:
    client = clients_of(pipeline, ("sendgrid",))["sendgrid"]
    emails = [f"split{n}-{uuid.uuid4().hex[:8]}@example.com" for n in range(5)]
    ids = []
    for email in emails:
        profile = Profile(id=f"p_split_{uuid.uuid4().hex}", email=email)
        member = client.member(profile)
        assert await store.save(profile, None, {"sendgrid": (member, _hash(member))})
        ids.append(profile.id)
    await sendgrid_sandbox.control(http, "faults", {"status": 400, "count": 1})
    await publish_batch(pipeline, ids, "sendgrid")

    async def all_sent():
        docs = [d async for d in pipeline.db.profiles.find({"_id": {"$in": ids}})]
        return all(d["esp"]["sendgrid"].get("sent_hash") == d["esp"]["sendgrid"]["member_hash"] for d in docs)

    await eventually(all_sent, timeout=60)
    for email in emails:
        assert await sendgrid_contact(http, sendgrid_sandbox, email) is not None
    await client.close()


async def test_syncs_to_sendgrid_in_flight_share_import_jobs_a_lane_gap_apart(mongo_uri, sandbox, klaviyo_sandbox, sendgrid_sandbox,
                                                                             http, tmp_path):
    """Every SendGrid write is a job: the sync process starts one per lane gap at most, and the syncs
    that arrive meanwhile go together in the next one, instead of one import per change."""
    async with bulk_pipeline(mongo_uri, sandbox, klaviyo_sandbox, sendgrid_sandbox, tmp_path, MERGETAG_WORKER_THREADS="32",
                             MERGETAG_SYNC_LANE_GAP_MS="200") as (pipeline, store):
        client = clients_of(pipeline, ("sendgrid",))["sendgrid"]
        tag = uuid.uuid4().hex[:8]
        emails = [f"lane{n}-{tag}@example.com" for n in range(policy.TAKE_ALONG_MIN - 5)]  # fewer than take a backlog along
        ids = []
        for n, email in enumerate(emails):
            stamp = {"event_time": datetime.now(timezone.utc), "source": "shopify", "event_id": f"lane-{tag}-{n}"}
            profile = Profile(id=f"p_lane_{uuid.uuid4().hex}", email=email, traits={"first_name": Trait(value=f"Lane{n}", **stamp)})
            member = client.member(profile)
            assert await store.save(profile, None, {"sendgrid": (member, _hash(member))})
            ids.append(profile.id)
        await sendgrid_sandbox.control(http, "job-delay", {"ms": 1500})
        await sendgrid_sandbox.control(http, "stats/reset", {})
        try:
            queue = topology.sync_queue(pipeline.env["MERGETAG_QUEUE_PREFIX"])
            publisher = Publisher(AMQP_URL, [queue], 5)
            for pid in ids:
                message_id, body = encode_message(queue, topology.SYNC_PROFILE_ACTOR, (pid, "sendgrid"))
                await publisher.publish(queue, body, message_id)
            await publisher.close()

            async def all_sent():
                docs = [d async for d in pipeline.db.profiles.find({"_id": {"$in": ids}})]
                return all(d["esp"]["sendgrid"].get("sent_hash") == d["esp"]["sendgrid"]["member_hash"] for d in docs)

            await eventually(all_sent, timeout=90)
            stats = await sendgrid_sandbox.control(http, "stats")
        finally:
            await sendgrid_sandbox.control(http, "job-delay", {"ms": 300})
        puts = stats["requests"].get("PUT /v3/marketing/contacts", 0)
        assert 1 <= puts <= len(ids) // 2
        assert puts == 1 or stats["upsert_min_gap_ms"] >= 200
        for n, email in enumerate(emails):
            contact = await sendgrid_contact(http, sendgrid_sandbox, email)
            assert contact is not None and contact["first_name"] == f"Lane{n}" and SENDGRID_LIST_ID in contact["list_ids"]
        await client.close()
