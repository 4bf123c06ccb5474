"""One pipeline, three ESPs: every change reaches Mailchimp, Klaviyo and SendGrid (their sandboxes, as
configured by the system's ESP file); consent and backlogs behave the same at each."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from typing import Any
from unittest import mock

from adapters.esps.registry import build_esp
from adapters.store.profiles import ProfileStore
from broker import topology
from broker.publisher import Publisher, encode_message
from schemas.profile import Profile
from tests.conftest import ESP_KEYS, HASHER, ROOT, SENDGRID_LIST_ID, eventually, post_webhook
from tests.support.samples import customer, customer_gid, order


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

    mc, kl, sg = await eventually(everywhere, timeout=30)
    assert mc["merge_fields"]["FNAME"] == "Tess" and kl["first_name"] == "Tess" and sg["first_name"] == "Tess"
    assert kl["properties"]["order_count"] == 1 and sg["custom_fields"]["orders"] == 1
    assert SENDGRID_LIST_ID in sg["list_ids"]

    # The same facts again (a new delivery, so the receiver's de-duplication does not catch it) change
    # nothing; a real change after them does. Each ESP hears exactly once more about this customer.
    before = await writes_for(http, email, sandbox, klaviyo_sandbox, sendgrid_sandbox)
    assert (await post_webhook(http, receiver, "customers/update", customer(email, first_name="Tess"))).status == 202
    assert (await post_webhook(http, receiver, "customers/update", customer(email, first_name="Tessa",
                                                                            updated_at="2024-02-01T10:00:00-05:00"))).status == 202

    async def renamed():
        now = await writes_for(http, email, sandbox, klaviyo_sandbox, sendgrid_sandbox)
        return now if all(n > b for n, b in zip(now, before)) else None

    await eventually(renamed, timeout=30)
    await asyncio.sleep(1)  # the coalescing window of any straggler
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

    await eventually(unsubscribed_everywhere, timeout=30)
    stats = await klaviyo_sandbox.control(http, "stats")
    assert stats["resubscribe_refused"] == 0  # mergetag never even asked


async def test_backlogs_go_in_bulk_jobs_and_refused_items_are_dead_lettered_alone(system, klaviyo_sandbox, sendgrid_sandbox, http):
    store = ProfileStore.connect(system.settings.mongodb_uri, system.settings.mongodb_database, HASHER)
    with mock.patch.dict(os.environ, ESP_KEYS):
        targets = system.settings.esp_targets()
    clients = {name: build_esp(name, targets[name]) for name in ("klaviyo", "sendgrid")}
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

    queue = topology.sync_queue(system.settings.queue_prefix)
    publisher = Publisher(system.settings.amqp_url, [queue], 5)
    for name in clients:
        message_id, body = encode_message(queue, topology.SYNC_BATCH_ACTOR, (ids, name))
        await publisher.publish(queue, body, message_id)
    await publisher.close()

    async def settled():
        docs = [d async for d in system.db.profiles.find({"_id": {"$in": ids}})]
        done = all(not d["esp"][n]["pending"] or d["esp"][n].get("failed_code") for d in docs for n in clients)
        return docs if done else None

    docs = await eventually(settled, timeout=60)
    by_email = {d["email"]: d["esp"] for d in docs}
    for name in clients:
        assert all(by_email[e][name]["sent_hash"] == by_email[e][name]["member_hash"] for e in good), name
        assert all(by_email[e][name]["failed_code"] == "esp_rejected" and "sent_hash" not in by_email[e][name] for e in bad), name
    kl_stats = await klaviyo_sandbox.control(http, "stats")
    sg_stats = await sendgrid_sandbox.control(http, "stats")
    assert 1 <= kl_stats["requests"].get("POST /api/profile-bulk-import-jobs", 0) <= 2  # one (two if the sweeper raced us)
    assert kl_stats["requests"].get("POST /api/profile-import", 0) == 0
    assert 1 <= sg_stats["requests"].get("PUT /v3/marketing/contacts", 0) <= 2
    assert await klaviyo_profile(http, klaviyo_sandbox, good[0]) is not None
    assert await sendgrid_contact(http, sendgrid_sandbox, good[-1]) is not None

    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "adapters.cli", "dlq", "list", "--queue", "sync", "--json"],
                                  cwd=ROOT, env=system.env, capture_output=True, text=True, timeout=60, check=True)
    bad_ids = {d["_id"] for d in docs if d["email"] in bad}
    letters = [d for d in json.loads(out.stdout) if d.get("profile_id") in bad_ids and d["error"] == "esp_rejected"]
    assert sorted((d["profile_id"], d["esp"]) for d in letters) == sorted((pid, name) for pid in bad_ids for name in clients)
    assert all(d["detail"].startswith(d["esp"]) and "@example" not in d["detail"] for d in letters)
    for client in clients.values():
        await client.close()
    await store.close()


def _hash(member: dict[str, Any] | None) -> str | None:
    from adapters.esps.base import member_hash

    return member_hash(member) if member is not None else None


async def test_a_bulk_request_refused_whole_is_split_so_the_good_ones_still_go(system, sendgrid_sandbox, http):
    """The ESP refuses a whole bulk request (a 400 naming one contact): the members go one by one,
    the good ones arrive and nothing waits for the bad one."""
    store = ProfileStore.connect(system.settings.mongodb_uri, system.settings.mongodb_database, HASHER)
    with mock.patch.dict(os.environ, ESP_KEYS):
        client = build_esp("sendgrid", system.settings.esp_targets()["sendgrid"])
    emails = [f"split{n}-{uuid.uuid4().hex[:8]}@example.com" for n in range(5)]
    ids = []
    for email in emails:
        profile = Profile(id=f"p_split_{uuid.uuid4().hex}", email=email)
        member = client.member(profile)
        assert await store.save(profile, None, {"sendgrid": (member, _hash(member))})
        ids.append(profile.id)
    await sendgrid_sandbox.control(http, "faults", {"status": 400, "count": 1})
    queue = topology.sync_queue(system.settings.queue_prefix)
    publisher = Publisher(system.settings.amqp_url, [queue], 5)
    message_id, body = encode_message(queue, topology.SYNC_BATCH_ACTOR, (ids, "sendgrid"))
    await publisher.publish(queue, body, message_id)
    await publisher.close()

    async def all_sent():
        docs = [d async for d in system.db.profiles.find({"_id": {"$in": ids}})]
        return all(d["esp"]["sendgrid"].get("sent_hash") == d["esp"]["sendgrid"]["member_hash"] for d in docs)

    await eventually(all_sent, timeout=60)
    for email in emails:
        assert await sendgrid_contact(http, sendgrid_sandbox, email) is not None
    await client.close()
    await store.close()
