"""Klaviyo is down for a whole minute while events keep coming: Mailchimp and SendGrid stay fresh,
Klaviyo's circuit opens (visible to operators), nothing is dead-lettered or lost, and once Klaviyo is
back its backlog drains with the unsubscribe first."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

from tests.conftest import ROOT, eventually, post_webhook
from tests.support.samples import customer, customer_gid
from tests.system.test_three_esps import klaviyo_profile, sendgrid_contact

OUTAGE_S = 60


def cli(system, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "adapters.cli", *args], cwd=ROOT, env=system.env, capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


async def test_a_minute_long_esp_outage(receiver, system, sandbox, klaviyo_sandbox, sendgrid_sandbox, http):
    tag = uuid.uuid4().hex[:8]
    emails = [f"outage{n}-{tag}@example.com" for n in range(20)]
    replies = await asyncio.gather(*(post_webhook(http, receiver, "customers/create", customer(e, first_name="Before")) for e in emails))
    assert {r.status for r in replies} == {202}

    async def everywhere(name: str):
        for e in emails:
            mc, kl = await sandbox.member(http, e), await klaviyo_profile(http, klaviyo_sandbox, e)
            sg = await sendgrid_contact(http, sendgrid_sandbox, e)
            if not (mc and kl and sg and mc["merge_fields"].get("FNAME") == name and kl["first_name"] == name and sg["first_name"] == name):
                return False
        return True

    await eventually(lambda: everywhere("Before"), timeout=60)

    start = len(await klaviyo_sandbox.control(http, "history"))
    began = time.time()
    await klaviyo_sandbox.control(http, "outage", {"seconds": 10 * OUTAGE_S})  # ended below, after a minute at least
    try:
        await _during_and_after(system, receiver, http, sandbox, klaviyo_sandbox, sendgrid_sandbox, emails, start, began)
    finally:
        await klaviyo_sandbox.control(http, "outage", {"seconds": 0})  # never leave Klaviyo down for the tests after


async def _during_and_after(system, receiver, http, sandbox, klaviyo_sandbox, sendgrid_sandbox, emails, start, began) -> None:
    """Events while Klaviyo is down (the last one an unsubscribe), then Klaviyo comes back."""
    urgent = emails[-1]
    later = "2025-06-01T10:00:00-05:00"
    replies = await asyncio.gather(*(post_webhook(http, receiver, "customers/update", customer(e, first_name="During", updated_at=later))
                                     for e in emails))
    assert {r.status for r in replies} == {202}
    unsubscribe = {"customer_id": customer_gid(urgent), "email_address": urgent,
                   "email_marketing_consent": {"state": "unsubscribed", "consent_updated_at": "2031-01-01T00:00:00Z"}}
    assert (await post_webhook(http, receiver, "customers_email_marketing_consent/update", unsubscribe)).status == 202

    # Isolation: the other two ESPs do not wait for Klaviyo.
    async def others_fresh():
        for e in emails:
            mc, sg = await sandbox.member(http, e), await sendgrid_contact(http, sendgrid_sandbox, e)
            if mc["merge_fields"].get("FNAME") != "During" or sg["first_name"] != "During":
                return False
        mc, sg = await sandbox.member(http, urgent), await sendgrid_contact(http, sendgrid_sandbox, urgent)
        return mc["status"] == "unsubscribed" and sg["suppressed"]

    await eventually(others_fresh, timeout=60)  # while Klaviyo is still down: they did not wait for it

    # The open circuit is visible to operators.
    async def klaviyo_open():
        status = await asyncio.to_thread(cli, system, "esp", "status")
        return status if status["klaviyo"]["circuit"] in ("open", "half-open") else None

    # A bulk job accepted just before the outage keeps its profiles' send lease until it runs out:
    # the circuit may take that long to see its five failures.
    status = await eventually(klaviyo_open, timeout=OUTAGE_S, interval=1)
    assert status["klaviyo"]["consecutive_failures"] >= 5
    assert status["mailchimp"]["circuit"] == "closed" and status["sendgrid"]["circuit"] == "closed"
    assert len(await klaviyo_sandbox.control(http, "history")) == start  # nothing got through

    await asyncio.sleep(max(0.0, began + OUTAGE_S - time.time()))
    down_until = (await klaviyo_sandbox.control(http, "outage", {"seconds": 0}))["down_until"]  # Klaviyo is back

    async def drained():
        firsts = []
        for at, email, fields in (await klaviyo_sandbox.control(http, "history"))[start:]:
            if email in emails and fields.get("first_name") == "During" and email not in [e for e, _ in firsts]:
                firsts.append((email, at))
        return firsts if len(firsts) == len(emails) else None

    firsts = await eventually(drained, timeout=90, interval=0.5)
    assert all(at >= down_until for _, at in firsts)  # nothing got through while it was down
    order = [e for e, _ in firsts]
    assert order.index(urgent) <= 2, order[:5]  # the unsubscribe went ahead of the backlog
    assert (await klaviyo_profile(http, klaviyo_sandbox, urgent))["subscriptions"]["email"]["marketing"]["consent"] == "UNSUBSCRIBED"

    # Nothing was lost, and nothing was dead-lettered by the outage: the backlog waited in MongoDB.
    async def recorded():  # Klaviyo holds them all; the sync's record of each send follows its answer
        found = [d async for d in system.db.profiles.find({"email": {"$in": emails}})]
        return found if len(found) == len(emails) and all(not d["esp"]["klaviyo"]["pending"] for d in found) else None

    docs = await eventually(recorded, timeout=60)
    ids = {d["_id"] for d in docs}
    letters = await asyncio.to_thread(cli, system, "dlq", "list", "--queue", "sync", "--json")
    assert not [d for d in letters if d.get("profile_id") in ids]
    # Each profile's update reached Klaviyo once after the outage, not once per retry.
    later_writes = [e for _, e, f in (await klaviyo_sandbox.control(http, "history"))[start:] if e in emails and f.get("first_name") == "During"]
    assert sorted(later_writes) == sorted(emails)
    assert (await asyncio.to_thread(cli, system, "esp", "status"))["klaviyo"]["circuit"] == "closed"
