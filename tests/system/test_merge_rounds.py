"""Merge rounds in flight on a real store: a full round is written while the one before it still is,
and a merge whose person a round in flight holds waits for that round instead of racing it."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from adapters.settings import Settings
from schemas.events import CustomerUpdated, Identity
from workers.profiles.batch import MergeBatcher
from workers.runtime import close_runtime, create_runtime

T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)


@pytest.fixture
async def rt(mongo_uri, monkeypatch):
    database = "rounds" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("MERGETAG_MAILCHIMP_API_KEY", "test0000000000000000000000000000-us1")  # nothing is sent
    monkeypatch.setenv("MERGETAG_MAILCHIMP_LIST_ID", "list")
    settings = Settings(mongodb_uri=mongo_uri, mongodb_database=database, queue_prefix=database, esps=["mailchimp"],
                        identity_hash_keys="rounds-test-identity-hash-key-0123456789")
    runtime = await create_runtime(settings)
    yield runtime
    await runtime.store.client.drop_database(database)
    await close_runtime(runtime)


class HeldWrites:
    """Wraps the store's bulk write: the first write waits (at most ``hold_s``) for a second one to begin,
    and every write notes which identity keys are being written while it is."""

    def __init__(self, store, hold_s: float = 10.0) -> None:  # noqa: ANN001
        self._store, self._save_many, self._hold_s = store, store.save_many, hold_s
        self.writes: list[set[str]] = []
        self.sizes: list[int] = []
        self.overlapping: set[str] = set()
        self.first_saw_second = False
        self._second = asyncio.Event()
        self._writing: Counter[str] = Counter()
        store.save_many = self.save_many

    async def save_many(self, saves):  # noqa: ANN001, ANN201
        keys = {k for save in saves for k in self._store.index(save.profile)}
        self.overlapping |= {k for k in keys if self._writing[k]}
        self._writing.update(keys)
        self.writes.append(keys)
        self.sizes.append(len(saves))
        if len(self.writes) == 2:
            self._second.set()
        try:
            if len(self.writes) == 1:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._second.wait(), self._hold_s)
                self.first_saw_second = self._second.is_set()
            return await self._save_many(saves)
        finally:
            self._writing.subtract(keys)


def update(n: int, person: str, **traits) -> CustomerUpdated:
    return CustomerUpdated(type="customer.updated", event_id=f"u{n}-{uuid.uuid4().hex[:6]}", source="shopify",
                           event_time=T0 + timedelta(minutes=n), received_at=T0,
                           identity=Identity(email=f"{person}@example.com", customer_id=f"c-{person}"),
                           traits={"first_name": f"N{n}", **traits})


async def merged(rt, person: str) -> dict:  # noqa: ANN001
    [(profile, _)] = await rt.store.find_owners([f"email:{person}@example.com"])
    return await rt.store.profiles.find_one({"_id": profile.id})


async def test_a_full_round_is_written_while_the_one_before_is_still_being_written(rt):
    writes = HeldWrites(rt.store)
    batcher = MergeBatcher(rt, max_merges=10, depth=2)
    events = [update(i, f"p{i}") for i in range(20)]
    results = await asyncio.gather(*(batcher.merge(e.identity, [e]) for e in events))
    assert writes.first_saw_second  # the second round's write began before the first's was done
    assert writes.sizes == [10, 10]  # two full rounds
    assert all(r.version == 1 for r in results)
    for i in (0, 19):
        assert (await merged(rt, f"p{i}"))["traits"]["first_name"]["value"] == f"N{i}"


async def test_a_merge_whose_person_a_round_in_flight_holds_waits_for_that_round(rt):
    writes = HeldWrites(rt.store, hold_s=2.0)
    batcher = MergeBatcher(rt, max_merges=2, depth=2)
    events = [update(1, "ann"), update(2, "bo"), update(3, "ann", city="Oslo"), update(4, "cy")]
    await asyncio.gather(*(batcher.merge(e.identity, [e]) for e in events))
    assert writes.overlapping == set()  # no person was written by two rounds at once
    assert writes.first_saw_second  # the second round (cy alone) still went while the first was written
    ann = await merged(rt, "ann")
    assert ann["version"] == 2  # ann's second merge waited for her first round, then wrote on top of it
    assert ann["traits"]["first_name"]["value"] == "N3" and ann["traits"]["city"]["value"] == "Oslo"
    assert (await merged(rt, "cy"))["traits"]["first_name"]["value"] == "N4"
