"""The merge's profile cache on a real store: a profile it merged is not read again, and nothing the
cache may have missed (another worker's write, an erasure, what the sync sent) is ever overwritten
or ignored: the version guard catches it, and the merge is read afresh."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from pymongo import AsyncMongoClient

from adapters.settings import Settings
from adapters.store.profiles import ProfileStore
from schemas.events import ConsentChanged, CustomerErased, CustomerUpdated, Identity, OrderCompleted
from tests.support.commands import CommandCounts
from workers.profiles.batch import MergeBatcher
from workers.profiles.forget import erase_person
from workers.runtime import close_runtime, create_runtime

T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)


@pytest.fixture
async def runtime(mongo_uri, monkeypatch):
    database = "cache" + uuid.uuid4().hex[:8]
    # Members are rendered for Mailchimp; nothing is sent, so any key will do.
    monkeypatch.setenv("MERGETAG_MAILCHIMP_API_KEY", "test0000000000000000000000000000-us1")
    monkeypatch.setenv("MERGETAG_MAILCHIMP_LIST_ID", "list")
    settings = Settings(mongodb_uri=mongo_uri, mongodb_database=database, queue_prefix=database, esps=["mailchimp"],
                        identity_hash_keys="cache-test-identity-hash-key-0123456789")
    rt = await create_runtime(settings)
    commands = CommandCounts()
    counted = ProfileStore(AsyncMongoClient(mongo_uri, tz_aware=True, event_listeners=[commands]), database, settings.hasher())
    counted.feed = rt.store.feed
    plain, rt.store = rt.store, counted
    yield rt, commands
    await counted.client.drop_database(database)
    await counted.close()
    rt.store = plain
    await close_runtime(rt)


def update(n: int, email: str, customer_id: str = "c1", **traits) -> CustomerUpdated:
    return CustomerUpdated(type="customer.updated", event_id=f"u{n}-{uuid.uuid4().hex[:6]}", source="shopify",
                           event_time=T0 + timedelta(minutes=n), received_at=T0,
                           identity=Identity(email=email, customer_id=customer_id), traits={"first_name": f"N{n}", **traits})


def order(n: int, email: str, customer_id: str = "c1") -> OrderCompleted:
    return OrderCompleted(order_id=f"o{n}", total="10.00", event_id=f"o{n}", source="shopify", event_time=T0 + timedelta(minutes=n),
                          received_at=T0, identity=Identity(email=email, customer_id=customer_id))


async def merge(batcher: MergeBatcher, event):
    return await batcher.merge(event.identity, [event])


async def doc(rt, email: str):
    [(profile, stored)] = await rt.store.find_owners([f"email:{email}"])
    return await rt.store.profiles.find_one({"_id": profile.id})


async def test_a_profile_merged_once_is_written_without_being_read_again(runtime):
    rt, commands = runtime
    batcher = MergeBatcher(rt, cache_profiles=100)
    await merge(batcher, update(1, "ann@example.com"))
    commands.counts.clear()
    result = await merge(batcher, update(2, "ann@example.com", city="Oslo"))
    assert dict(commands.counts) == {"update": 1}  # the guarded write alone
    stored = await doc(rt, "ann@example.com")
    assert stored["version"] == 2 == result.version
    assert stored["traits"]["first_name"]["value"] == "N2" and stored["traits"]["city"]["value"] == "Oslo"
    assert result.targets == ["mailchimp"]


async def test_a_write_by_another_worker_meanwhile_is_caught_by_the_guard_and_kept(runtime):
    rt, commands = runtime
    ours, theirs = MergeBatcher(rt, cache_profiles=100), MergeBatcher(rt, cache_profiles=100)
    await merge(ours, update(1, "bob@example.com"))
    await merge(theirs, order(2, "bob@example.com"))  # another process: our cached copy is now one version behind
    commands.counts.clear()
    result = await merge(ours, update(3, "bob@example.com", city="Bergen"))
    stored = await doc(rt, "bob@example.com")
    assert stored["version"] == 3 == result.version
    assert stored["computed"]["order_count"] == 1 and stored["traits"]["city"]["value"] == "Bergen"  # neither write lost
    assert commands.counts["find"] >= 1  # read afresh after the missed guard


async def test_a_person_erased_meanwhile_stays_erased(runtime):
    rt, _ = runtime
    batcher = MergeBatcher(rt, cache_profiles=100)
    await merge(batcher, update(1, "cy@example.com", city="Oslo"))
    erased = CustomerErased(event_id="e1", source="shopify", event_time=T0 + timedelta(minutes=2), received_at=T0,
                            identity=Identity(email="cy@example.com", customer_id="c1"))
    assert await erase_person(rt, erased) is not None
    result = await merge(batcher, update(3, "cy@example.com", city="Paris"))
    assert result.version is None and result.targets == []
    [stored] = [d async for d in rt.store.profiles.find({"erased": {"$ne": None}})]
    assert stored["_id"] == result.profile_id
    assert "traits" not in stored or not stored["traits"]
    assert not await rt.store.profiles.find_one({"traits.city.value": "Paris"})


async def test_address_work_is_decided_on_what_the_sync_recorded_since_not_on_the_cache(runtime):
    """The cache read the profile before the sync sent it; switching back to a former address must still
    retire the one the ESP holds now."""
    rt, _ = runtime
    batcher = MergeBatcher(rt, cache_profiles=100)
    await merge(batcher, update(1, "dee@example.com"))
    await merge(batcher, update(2, "dee.new@example.com"))  # the customer id finds her: her address changes
    stored = await doc(rt, "dee.new@example.com")
    assert stored["email"] == "dee.new@example.com"
    # The sync sends her member to Mailchimp (what mark_sent records).
    await rt.store.profiles.update_one({"_id": stored["_id"]}, {"$set": {"esp.mailchimp.sent_hash": stored["esp"]["mailchimp"]["member_hash"],
                                                                         "esp.mailchimp.pending": False}})
    await merge(batcher, update(3, "dee@example.com"))  # back to the former address: every key is in the cache
    after = await doc(rt, "dee@example.com")
    assert after["email"] == "dee@example.com"
    assert after["esp"]["mailchimp"]["retire"] == ["dee.new@example.com"]


async def test_an_unsubscribe_through_the_cache_reaches_every_former_address(runtime):
    rt, _ = runtime
    batcher = MergeBatcher(rt, cache_profiles=100)
    await merge(batcher, update(1, "eve@example.com"))
    await merge(batcher, update(2, "eve.two@example.com"))
    result = await merge(batcher, ConsentChanged(event_id="x1", source="shopify", event_time=T0 + timedelta(minutes=3), received_at=T0,
                                                 identity=Identity(email="eve.two@example.com", customer_id="c1"), state="unsubscribed"))
    assert result.urgent
    after = await doc(rt, "eve.two@example.com")
    assert after["consent"]["email"]["state"] == "unsubscribed"
    assert after["esp"]["mailchimp"]["unsubscribe"] == ["eve@example.com"]
