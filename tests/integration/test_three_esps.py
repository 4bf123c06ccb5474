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

from adapters.esp.registry import build_esp
from adapters.store import ProfileStore
from broker import topology
from broker.publisher import Publisher, encode_message
from schemas.profile import Profile
from tests.conftest import ESP_KEYS, ROOT, SENDGRID_LIST_ID, eventually, post_webhook
from tests.samples import customer, customer_gid, order


async def klaviyo_profile(http, klaviyo_sandbox, email: str) -> dict[str, Any] | None:
    rows = await klaviyo_sandbox.control(http, "profiles")
    return next((r for r in rows if r.get("email") == email), None)


async def sendgrid_contact(http, sendgrid_sandbox, email: str) -> dict[str, Any] | None:
    listing = await sendgrid_sandbox.control(http, "contacts")
    return next((c for c in listing["contacts"] if c.get("email") == email), None)


async def writes(http, *sandboxes) -> list[int]:
    return [len(await s.control(http, "history")) for s in sandboxes]


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

    # The same webhook again changes nothing: no ESP hears about it.
    await asyncio.sleep(1.5)
    before = await writes(http, sandbox, klaviyo_sandbox, sendgrid_sandbox)
    assert (await post_webhook(http, receiver, "customers/update", customer(email, first_name="Tess"))).status == 202
    await asyncio.sleep(3)
    assert await writes(http, sandbox, klaviyo_sandbox, sendgrid_sandbox) == before

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
    store = ProfileStore.connect(system.settings.mongodb_uri, system.settings.mongodb_database)
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
    assert kl_stats["requests"].get("POST /api/profile-bulk-import-jobs", 0) <= 2  # one (two if the sweeper raced us)
    assert kl_stats["requests"].get("POST /api/profile-import", 0) == 0
    assert sg_stats["requests"].get("PUT /v3/marketing/contacts", 0) <= 2
    assert await klaviyo_profile(http, klaviyo_sandbox, good[0]) is not None
    assert await sendgrid_contact(http, sendgrid_sandbox, good[-1]) is not None

    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "adapters.cli", "dlq", "list", "--queue", "sync", "--json"],
                                  cwd=ROOT, env=system.env, capture_output=True, text=True, timeout=60, check=True)
    letters = [d for d in json.loads(out.stdout) if d["actor"] == "sync_profile" and d["error"] == "esp_rejected"
               and d["detail"].startswith(("klaviyo", "sendgrid"))]
    assert {d["detail"].split()[0] for d in letters} == {"klaviyo", "sendgrid"}
    assert not any("@example" in d["detail"] for d in letters)
    for client in clients.values():
        await client.close()
    await store.close()


def _hash(member: dict[str, Any] | None) -> str | None:
    from adapters.esp.base import member_hash

    return member_hash(member) if member is not None else None
