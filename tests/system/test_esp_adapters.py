"""The Klaviyo and SendGrid adapters against their sandboxes (real processes, real HTTP), with
every request they send checked against the vendor's OpenAPI spec."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

from adapters.esps.base import Esp
from adapters.esps.guard import EspGuard
from adapters.esps.klaviyo.client import Klaviyo
from adapters.esps.sendgrid.client import SendGrid
from schemas.errors import EspRejected, EspUnavailable
from schemas.profile import AbandonedCart, Computed, Consent, Profile, Trait
from tests.conftest import KLAVIYO_KEY, SENDGRID_API_KEY, SENDGRID_LIST_ID, EspSandbox, eventually, start_sandbox, stop_sandbox
from tests.support.openapi_check import check_recorded
from workers.sync.reconcile import compare

T = datetime(2026, 3, 4, 5, 6, tzinfo=timezone.utc)
STAMP = {"event_time": T, "source": "shopify", "event_id": "e"}
REDIS = "redis://127.0.0.1:6379/0"
KLAVIYO_FIELDS = {"first_name": "first_name", "city": "location.city", "lifetime_value": "lifetime_value",
                  "abandoned_cart_url": "cart_url"}
SENDGRID_FIELDS = {"first_name": "first_name", "lifetime_value": {"tag": "ltv", "type": "number"}, "order_count": "orders",
                   "abandoned_cart_url": "cart_url", "abandoned_cart_value": "cart_value"}


def person(email: str | None, name: str = "Ann", cart: bool = True, unsubscribed: bool = False) -> Profile:
    return Profile(
        id=f"p_{uuid.uuid4().hex[:8]}", email=email,
        traits={"first_name": Trait(value=name, **STAMP), "city": Trait(value="Oslo", **STAMP)},
        computed=Computed(lifetime_value=Decimal("42.5"), order_count=3,
                          abandoned_cart=AbandonedCart(checkout_id="c1", url="https://shop.example/c1", value=Decimal("19.9"),
                                                       at=T) if cart else None),
        consent={"email": Consent(state="unsubscribed", **STAMP)} if unsubscribed else {},
    )


def email() -> str:
    return f"a-{uuid.uuid4().hex[:10]}@example.com"


def klaviyo(sandbox: EspSandbox, guard: EspGuard | None = None) -> Klaviyo:
    return Klaviyo(sandbox.url, KLAVIYO_KEY, KLAVIYO_FIELDS, timeout=5, job_timeout=20, guard=guard)


def sendgrid(sandbox: EspSandbox, guard: EspGuard | None = None) -> SendGrid:
    return SendGrid(sandbox.url, SENDGRID_API_KEY, SENDGRID_FIELDS, list_id=SENDGRID_LIST_ID, timeout=5, job_timeout=20, guard=guard)


@pytest.fixture(params=["klaviyo", "sendgrid"])
async def esp(request, klaviyo_sandbox, sendgrid_sandbox, http) -> Any:
    """Each adapter with its sandbox; afterwards every request it sent must conform to the vendor's spec."""
    sandbox = klaviyo_sandbox if request.param == "klaviyo" else sendgrid_sandbox
    await sandbox.control(http, "stats/reset", {})
    client = klaviyo(sandbox) if request.param == "klaviyo" else sendgrid(sandbox)
    yield client, sandbox
    await client.close()
    recorded = await sandbox.control(http, "requests")
    in_spec = [r for r in recorded if not r["path"].startswith(("/v3/asm/", "/v3/marketing/field_definitions"))
               ]
    problems = [(r["method"], r["path"], p) for r in in_spec for p in check_recorded(request.param, r)]
    assert recorded and not problems


async def test_upsert_is_held_as_sent_and_a_computed_value_is_blanked(esp):
    client, _ = esp
    address = email()
    first = client.member(person(address))
    await client.upsert(first)
    held = await client.held(address)
    assert held is not None and compare("p", client.fields(first), False, held) is None
    assert held.fields["cart_url"] == "https://shop.example/c1" and held.fields["first_name"] == "Ann"

    # The order arrived: the cart is gone from the profile, so it must be gone from the ESP too.
    second = client.member(person(address, name="Anna", cart=False))
    await client.upsert(second)
    held = await client.held(address)
    assert compare("p", client.fields(second), False, held) is None
    assert held.fields.get("cart_url") in (None, "") and held.fields["first_name"] == "Anna"
    assert client.member(person(None)) is None


async def test_bulk_with_good_and_bad_items_refuses_only_the_bad(esp, http):
    client, sandbox = esp
    good = [client.member(person(email(), name=f"N{i}")) for i in range(5)]
    bad = client.member(person(email()))
    if client.kind == "klaviyo":
        bad["profile"]["attributes"]["email"] = "not-an-email"
    else:
        bad["contact"]["email"] = "not-an-email"
    refused = await client.upsert_batch([*good[:2], bad, *good[2:]])
    assert list(refused) == ["not-an-email"] and "not-an-email" not in refused["not-an-email"]
    # Polled to the end before returning: every good item is already there.
    for member in good:
        held = await client.held(client.key(member))
        assert held is not None and compare("p", client.fields(member), False, held) is None
    stats = await sandbox.control(http, "stats")
    bulk_route = "POST /api/profile-bulk-import-jobs" if client.kind == "klaviyo" else "PUT /v3/marketing/contacts"
    assert stats["requests"][bulk_route] == 1


async def test_unsubscribe_is_pushed_and_never_undone(esp, http):
    client, sandbox = esp
    address = email()
    await client.upsert(client.member(person(address)))
    assert not (await client.held(address)).unsubscribed
    leaving = client.member(person(address, unsubscribed=True))
    assert client.unsubscribed(leaving)
    await client.upsert(leaving)
    assert (await client.held(address)).unsubscribed
    # A later update (in bulk, too) carries no subscription: the unsubscribe stands.
    await client.upsert_batch([client.member(person(address, name="Later"))])
    held = await client.held(address)
    assert held.unsubscribed and held.fields["first_name"] == "Later"
    # mergetag never even asks to subscribe anyone.
    recorded = await sandbox.control(http, "requests")
    assert not [r for r in recorded if "subscription-bulk-create" in r["path"] or r["path"].startswith("/v3/asm/suppressions/global/")
                and r["method"] == "DELETE"]


async def test_erase_removes_the_contact(esp):
    client, _ = esp
    address = email()
    await client.upsert(client.member(person(address)))
    await client.erase(address)

    async def gone():
        return await client.held(address) is None

    await eventually(gone)
    await client.erase(address)  # already gone: nothing to do, no error


async def test_field_mapping_is_checked_against_the_account(klaviyo_sandbox, sendgrid_sandbox):
    sg = SendGrid(sendgrid_sandbox.url, SENDGRID_API_KEY, {"first_name": "first_name", "shoe_size": "shoes",
                                                           "lifetime_value": {"tag": "tier", "type": "number"}})
    kl = Klaviyo(klaviyo_sandbox.url, KLAVIYO_KEY, {"city": "location.town", "first_name": {"tag": "first_name", "type": "number"}})
    try:
        assert await sg.field_problems() == ["lifetime_value: tier is a text field, the mapping converts to number",
                                             "shoe_size: custom field shoes is not defined"]
        assert await kl.field_problems() == ["city: location.town is not a Klaviyo location attribute",
                                             "first_name: first_name is a text attribute, the mapping converts to number"]
        assert await sendgrid(sendgrid_sandbox).field_problems() == [] and await klaviyo(klaviyo_sandbox).field_problems() == []
    finally:
        await sg.close()
        await kl.close()


async def test_errors_map_to_retryable_and_permanent(esp, http):
    client, sandbox = esp
    await sandbox.control(http, "faults", {"status": 503, "count": 1})
    with pytest.raises(EspUnavailable):
        await client.upsert(client.member(person(email())))
    await sandbox.control(http, "faults", {"status": 400, "count": 1})
    with pytest.raises(EspRejected) as rejected:
        await client.upsert(client.member(person(email())))
    assert "@" not in rejected.value.detail
    wrong_key = (Klaviyo(sandbox.url, "pk_wrong", {}) if client.kind == "klaviyo" else SendGrid(sandbox.url, "SG.wrong", {}))
    try:
        with pytest.raises(EspUnavailable) as misconfigured:
            await wrong_key.upsert(wrong_key.member(person(email())))
        assert misconfigured.value.code == "esp_misconfigured"
    finally:
        await wrong_key.close()


async def test_klaviyo_rate_windows_are_shared_and_never_exceeded(http):
    """Two holders of one account's guard (as two sync processes) share its 4/s burst window: a sandbox
    of their own never sees more than 4 in a second (plus one of slack, for a sandbox process that a busy
    machine delays: requests queued meanwhile are handled together), never 8 as two unshared guards would
    send, and never has to refuse one."""
    sandbox = start_sandbox("klaviyo", "--api-key", KLAVIYO_KEY, "--import-limits", "5,1000")
    account = f"klaviyo:{uuid.uuid4().hex[:8]}"
    rates = {"import": [(4, 1.0), (1000, 60.0)], "default": [(100, 1.0)], "bulk": [(10, 1.0)]}
    guards = [EspGuard(REDIS, account, limit=10, rates=rates, prefix="ratetest", wait_s=30) for _ in range(2)]
    clients = [klaviyo(sandbox, g) for g in guards]
    try:
        members = [clients[0].member(person(email())) for _ in range(14)]
        await asyncio.gather(*(clients[i % 2].upsert(m) for i, m in enumerate(members)))
        stats = await sandbox.control(http, "stats")
        assert stats["throttled"] == 0
        assert stats["requests"]["POST /api/profile-import"] == 14
        assert 0 < stats["rate_limits"]["POST /api/profile-import"]["peak_attempted_1s"] <= 5
    finally:
        for c in clients:
            await c.close()
        for g in guards:
            await g.close()
        stop_sandbox(sandbox)


async def test_sendgrid_rate_headers_pause_every_holder_instead_of_provoking_429s(http):
    """A 4-per-2-seconds budget, announced only by X-RateLimit-* headers: the adapters stop when it is
    spent and resume at the reset, so the sandbox never has to refuse one."""
    sandbox = start_sandbox("sendgrid", "--api-key", SENDGRID_API_KEY, "--job-delay-ms", "50", "--list-ids", SENDGRID_LIST_ID,
                            "--custom-fields", "ltv:Number,orders:Number,cart_url:Text,cart_value:Number",
                            "--rate-limit", "4", "--rate-window", "2", "--other-rate-limit", "1000", "--other-rate-window", "1")
    account = f"sendgrid:{uuid.uuid4().hex[:8]}"
    guards = [EspGuard(REDIS, account, limit=10, prefix="ratetest", wait_s=30) for _ in range(2)]
    clients = [sendgrid(sandbox, g) for g in guards]
    try:
        for i in range(10):
            await clients[i % 2].upsert(clients[0].member(person(email())))
        stats = await sandbox.control(http, "stats")
        assert stats["requests"]["PUT /v3/marketing/contacts"] == 10
        assert stats["rate_limits"]["upsert"]["throttled"] == 0 and stats["rate_limits"]["upsert"]["peak_per_window"] <= 4
    finally:
        for c in clients:
            await c.close()
        for g in guards:
            await g.close()
        stop_sandbox(sandbox)


async def test_a_429_halves_connections_and_rate_and_successes_win_them_back(sendgrid_sandbox, http):
    account = f"sendgrid:{uuid.uuid4().hex[:8]}"
    guard = EspGuard(REDIS, account, limit=10, prefix="ratetest", wait_s=30, failures=100)
    client: Esp = sendgrid(sendgrid_sandbox, guard)
    await sendgrid_sandbox.control(http, "faults", {"status": 429, "count": 1})
    with pytest.raises(EspUnavailable) as throttled:
        await client.upsert(client.member(person(email())))
    assert "429" in throttled.value.detail
    state = await guard.state()
    assert state["connection_limit"] == 5 and state["rate_scale"] == 0.5
    await client.upsert(client.member(person(email())))
    recovered = await guard.state()
    assert recovered["connection_limit"] > 5 and recovered["rate_scale"] > 0.5
    await client.close()
    await guard.close()

