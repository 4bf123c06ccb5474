"""A signed webhook all the way: receiver -> RabbitMQ -> actors -> MongoDB -> sync -> Mailchimp sandbox."""

import uuid

from tests.conftest import eventually, index_key, post_webhook
from tests.support.samples import customer, order


def unique_email() -> str:
    return f"e2e-{uuid.uuid4().hex[:12]}@example.com"


async def test_signed_webhook_reaches_the_mailchimp_member(receiver, sandbox, system, http):
    email = unique_email()
    response = await post_webhook(http, receiver, "customers/create", customer(email, first_name="Bob"))
    assert response.status == 202

    member = await eventually(lambda: sandbox.member(http, email))
    assert member["status"] == "subscribed"  # the sample accepts marketing; status_if_new applies
    assert member["merge_fields"]["FNAME"] == "Bob"
    assert member["merge_fields"]["LNAME"] == "Biller"
    assert member["merge_fields"]["TIER"] == "bronze"

    response = await post_webhook(http, receiver, "orders/create", order(email, total="1200.00"))
    assert response.status == 202

    async def updated():
        m = await sandbox.member(http, email)
        return m if m["merge_fields"].get("ORDERS") == 1 else None

    member = await eventually(updated)
    assert member["merge_fields"]["LTV"] == 1200.0
    assert member["merge_fields"]["TIER"] == "gold"
    assert member["merge_fields"]["LASTORDER"] == "2024-01-02"

    async def recorded():  # the ESP answers before the sync records what it holds: wait for the record
        doc = await system.db.profiles.find_one({"email": email})
        return doc if doc["esp"]["mailchimp"]["pending"] is False else None

    profile = await eventually(recorded)
    assert profile["computed"]["order_count"] == 1
    assert profile["traits"]["first_name"]["source"] == "shopify"


async def _final_state(system, sandbox, http, email):
    async def settled():
        doc = await system.db.profiles.find_one({"email": email})
        return doc if doc and doc["esp"]["mailchimp"].get("pending") is False else None

    doc = await eventually(settled)
    member = await sandbox.member(http, email)
    return doc, member


async def test_duplicates_and_reverse_order_give_the_same_profile_and_member(receiver, sandbox, system, http):
    in_order, reversed_, twice = unique_email(), unique_email(), unique_email()
    older = dict(first_name="Old", updated_at="2024-05-01T10:00:00Z")
    newer = dict(first_name="New", updated_at="2024-05-02T10:00:00Z")

    for payload in (customer(in_order, **older), customer(in_order, **newer)):
        assert (await post_webhook(http, receiver, "customers/update", payload)).status == 202
    doc_a, member_a = await _final_state(system, sandbox, http, in_order)

    for payload in (customer(reversed_, **newer), customer(reversed_, **older)):
        assert (await post_webhook(http, receiver, "customers/update", payload)).status == 202
    replies = [
        await post_webhook(http, receiver, "customers/update", customer(twice, **version), webhook_id=delivery_id)
        for version, delivery_id in ((older, "d-old"), (newer, "d-new"), (newer, "d-new"), (older, "d-old"))
    ]
    assert [r.status for r in replies] == [202] * 4
    # The re-sent deliveries are recognised (Redis) and not queued again.
    assert [r.json()["duplicates"] for r in replies] == [0, 0, 1, 1]
    order_body = order(twice, total="50.00")
    for _ in range(3):
        assert (await post_webhook(http, receiver, "orders/create", order_body)).status == 202
    doc_b, member_b = await _final_state(system, sandbox, http, reversed_)

    async def twice_has_order():
        doc = await system.db.profiles.find_one({"email": twice})
        return doc if doc and doc["orders"] and doc["esp"]["mailchimp"].get("pending") is False else None

    doc_c = await eventually(twice_has_order)
    member_c = await sandbox.member(http, twice)
    assert doc_c["traits"]["first_name"]["value"] == "New"

    def lineage(doc):  # event ids name each customer; everything else must be equal
        return {name: (t["value"], t["event_time"], t["source"]) for name, t in doc["traits"].items()}

    assert lineage(doc_a) == lineage(doc_b)
    assert doc_a["traits"]["first_name"]["value"] == "New"
    assert member_a["merge_fields"] == member_b["merge_fields"]
    assert member_a["merge_fields"]["FNAME"] == "New"
    # Re-delivered orders never double count.
    assert doc_c["computed"]["order_count"] == 1
    assert doc_c["computed"]["lifetime_value"] == "50.00"
    assert member_c["merge_fields"]["ORDERS"] == 1


async def test_unchanged_profile_is_not_sent_again(receiver, sandbox, system, http):
    email = unique_email()
    payload = customer(email, first_name="Same")
    assert (await post_webhook(http, receiver, "customers/update", payload)).status == 202
    first = await eventually(lambda: sandbox.member(http, email))
    assert first["update_count"] == 1
    doc = await system.db.profiles.find_one({"email": email})
    for _ in range(3):
        assert (await post_webhook(http, receiver, "customers/update", payload)).status == 202

    async def processed_and_settled():
        counts = await system.db.profiles.find_one({"email": email})
        return counts["version"] == doc["version"] and not counts["esp"]["mailchimp"]["pending"]

    await eventually(processed_and_settled)
    # Wait past the sweeper's grace period so a stray re-send would have happened.
    import asyncio

    await asyncio.sleep(2.0)
    assert (await sandbox.member(http, email))["update_count"] == 1


async def test_unsubscribed_member_is_never_resubscribed(receiver, sandbox, system, http):
    email = unique_email()
    unsubscribe = {"customer_id": 42, "email_address": email,
                   "email_marketing_consent": {"state": "unsubscribed", "consent_updated_at": "2024-06-01T00:00:00Z"}}
    assert (await post_webhook(http, receiver, "customers_email_marketing_consent/update", unsubscribe)).status == 202
    member = await eventually(lambda: sandbox.member(http, email))
    assert member["status"] == "unsubscribed"
    # A later profile update that still says accepts_marketing=true (stale) must not resubscribe.
    stale = customer(email, first_name="Later", updated_at="2024-07-01T00:00:00Z",
                     accepts_marketing=True, accepts_marketing_updated_at="2024-01-01T00:00:00Z")
    assert (await post_webhook(http, receiver, "customers/update", stale)).status == 202

    async def renamed():
        m = await sandbox.member(http, email)
        return m if m["merge_fields"].get("FNAME") == "Later" else None

    member = await eventually(renamed)
    assert member["status"] == "unsubscribed"


async def test_profile_show_prints_lineage_and_quality_counts(receiver, system, http):
    import asyncio
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    email = unique_email()
    future = customer(email, first_name="Lin", updated_at="2099-01-01T00:00:00Z")
    assert (await post_webhook(http, receiver, "customers/update", future)).status == 202

    async def merged():
        return await system.db.profiles.find_one({"email": email})

    await eventually(merged)

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "adapters.cli", *args], cwd=ROOT, env=system.env,
                             capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout)

    shown = await asyncio.to_thread(cli, "profile", "show", email.upper())
    assert shown["email"] == email
    assert shown["traits"]["first_name"]["value"] == "Lin"
    assert shown["traits"]["first_name"]["source"] == "shopify"
    assert shown["traits"]["first_name"]["event_id"].startswith("shopify:customer:")
    assert shown["flags"]["event_time_in_future"]
    quality = await asyncio.to_thread(cli, "profile", "quality")
    assert quality["event_time_in_future"]["profiles"] >= 1


async def test_abandoned_cart_is_marked_after_the_delay_and_cleared_by_the_order(receiver, sandbox, system, http):
    from tests.support.samples import sample

    email = unique_email()
    checkout = sample("CheckoutsCreate")
    checkout.update(email=email, token=uuid.uuid4().hex, updated_at="2025-03-01T10:00:00Z", total_price="120.50")
    checkout["customer"].update(email=email, admin_graphql_api_id=f"gid://shopify/Customer/{uuid.uuid4().int % 10**15}")
    assert (await post_webhook(http, receiver, "checkouts/create", checkout)).status == 202

    async def abandoned():
        m = await sandbox.member(http, email)
        return m if m and m["merge_fields"].get("CARTURL") else None

    member = await eventually(abandoned)  # the delayed check ran (2 s in these tests)
    assert member["merge_fields"]["CARTURL"] == checkout["abandoned_checkout_url"]
    assert member["merge_fields"]["CARTVAL"] == 120.5

    bought = order(email, total="120.50", processed_at="2025-03-01T10:30:00Z")
    bought["customer"] = checkout["customer"]
    assert (await post_webhook(http, receiver, "orders/create", bought)).status == 202

    async def cleared():
        m = await sandbox.member(http, email)
        return m if m["merge_fields"].get("CARTURL") == "" else None

    member = await eventually(cleared)
    assert member["merge_fields"]["ORDERS"] == 1
    doc = await system.db.profiles.find_one({"email": email})
    assert doc["computed"]["abandoned_cart"] is None and doc["expired_checkouts"] == [checkout["token"]]


async def test_a_burst_of_changes_is_coalesced_into_few_esp_updates(receiver, sandbox, system, http):
    import asyncio

    email = unique_email()
    burst = [customer(email, first_name=f"V{n:02d}", updated_at=f"2025-06-01T10:00:{n:02d}Z") for n in range(30)]
    replies = await asyncio.gather(*(post_webhook(http, receiver, "customers/update", body) for body in burst))
    assert {r.status for r in replies} == {202}

    async def final():
        m = await sandbox.member(http, email)
        return m if m and m["merge_fields"]["FNAME"] == "V29" else None

    await eventually(final)

    async def settled():
        doc = await system.db.profiles.find_one({"email": email})
        return doc if doc and doc["esp"]["mailchimp"].get("pending") is False else None

    await eventually(settled)
    member = await sandbox.member(http, email)
    assert member["merge_fields"]["FNAME"] == "V29"
    async with http.get(f"{sandbox.url}/_sandbox/history") as r:
        writes = sorted(at for at, who, _ in await r.json() if who == email)
    assert len(writes) == member["update_count"]
    # 30 changes: at most one PUT per coalescing window (250 ms) while they keep coming, far fewer than
    # 30 (how many windows the burst spans depends on how fast this machine merges it).
    assert len(writes) <= 15, len(writes)


async def test_an_erased_person_stays_erased_even_when_late_events_arrive(receiver, sandbox, system, http):
    email = unique_email()
    body = customer(email, first_name="Erin")
    assert (await post_webhook(http, receiver, "customers/create", body)).status == 202
    await eventually(lambda: sandbox.member(http, email))
    profile_id = (await system.db.profiles.find_one({"email": email}))["_id"]
    gid = body["admin_graphql_api_id"].rsplit("/", 1)[1]
    redact = {"shop_id": 1, "shop_domain": "test.myshopify.com", "customer": {"id": int(gid), "email": email, "phone": None},
              "orders_to_redact": []}
    assert (await post_webhook(http, receiver, "customers/redact", redact)).status == 202

    async def gone():
        return await sandbox.member(http, email) is None

    await eventually(gone)  # permanently deleted at the ESP

    async def forgotten():  # the tombstone no longer holds the address, not even for the ESP erasure and its read-back
        docs = [d async for d in system.db.profiles.find({"erased": {"$ne": None}})]
        return docs if docs and email not in str(docs) else None

    await eventually(forgotten)
    assert await system.db.profiles.count_documents({"email": email}) == 0
    assert await system.db.profiles.count_documents({"keys": index_key(f"email:{email}"), "erased": None}) == 0
    # Late events — older ones and newer ones, by email or by Shopify id — are not kept, and nothing is re-created.
    late_order = order(email, total="99.00", processed_at="2020-01-01T00:00:00Z")
    assert (await post_webhook(http, receiver, "orders/create", late_order)).status == 202
    assert (await post_webhook(http, receiver, "customers/update", customer(email, first_name="Back", updated_at="2030-01-01T00:00:00Z"))).status == 202

    async def both_dropped():  # the workers have seen both, and counted them on the erasure's receipt
        receipt = await system.db.erasures.find_one({"profile_ids": profile_id})
        return receipt if receipt and receipt.get("late_events", 0) >= 2 else None

    await eventually(both_dropped)
    assert await system.db.profiles.count_documents({"email": email}) == 0
    assert await sandbox.member(http, email) is None
    assert email not in str([d async for d in system.db.profiles.find({"erased": {"$ne": None}})])
