"""The sweeper's pass over a target on a real store: one read when few wait, claims as before."""

import uuid
from datetime import timedelta
from typing import Any

import pytest
from pymongo import monitoring

from adapters.store.profiles import ProfileStore
from schemas.profile import Profile
from tests.conftest import HASHER
from workers.sync import sweeper


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


class Sent:
    """What the sweeper enqueues, by kind (the actors' ``send`` and ``alone``)."""

    def __init__(self) -> None:
        self.urgent: list[str] = []
        self.singles: list[str] = []
        self.batches: list[list[str]] = []
        self.sync_urgent = _Send(lambda pid, esp: self.urgent.append(pid))
        self.sync_batch = _Send(lambda ids, esp: self.batches.append(list(ids)))

    async def alone(self, ids: list[str], esp: str) -> None:
        self.singles += ids

    @property
    def pending(self) -> list[str]:
        return sorted([*self.singles, *(pid for batch in self.batches for pid in batch)])


class _Send:
    def __init__(self, record: Any) -> None:
        self.send = record


@pytest.fixture
async def counted(mongo_uri):
    commands = Commands()
    store = ProfileStore.connect(mongo_uri, "sweep" + uuid.uuid4().hex[:8], HASHER, event_listeners=[commands])
    await store.ensure_indexes()
    yield store, commands
    await store.client.drop_database(store.profiles.database.name)
    await store.close()


async def sweep(store: ProfileStore, sent: Sent, batch_limit: int = 500, **options: Any) -> int:
    options = {"grace": timedelta(0), "lease": timedelta(seconds=60), **options}
    actors: Any = sent  # what the sweeper calls of SyncActors
    return await sweeper.sweep_once(store, actors, {"mailchimp": sweeper.Target(batch_limit)}, **options)


async def test_a_light_pass_reads_once_sends_urgent_ones_first_and_claims_each_once_per_lease(counted):
    store, commands = counted
    for n in range(3):
        assert await store.save(Profile(id=f"p{n}", email=f"p{n}@example.com"), None, {"mailchimp": ({"m": n}, f"h{n}")})
    assert await store.save(Profile(id="consent", email="c@example.com"), None, {"mailchimp": ({"m": "c"}, "hc")}, urgent=True)
    sent = Sent()
    commands.names.clear()
    assert await sweep(store, sent) == 4
    assert sent.urgent == ["consent"]
    assert sent.pending == ["p0", "p1", "p2"]
    assert commands.names == ["find", "update"]  # one read of the waiting, one bulk write of the claims
    commands.names.clear()
    assert await sweep(store, Sent()) == 0  # within the lease: nothing again
    assert commands.names == ["find"]
    again = Sent()
    assert await sweep(store, again, lease=timedelta(0)) == 4  # the lease over, still pending: again
    assert again.urgent == ["consent"] and again.pending == ["p0", "p1", "p2"]


async def test_a_backlog_past_one_read_is_claimed_by_the_store_and_sent_in_bulk(counted):
    store, _ = counted
    for n in range(12):
        assert await store.save(Profile(id=f"b{n:02}", email=f"b{n}@example.com"), None, {"mailchimp": ({"m": n}, f"h{n}")})
    # A batch of one, so a pass claims at most five (policy.sweep_limit) and reads only that many: past one read.
    passes = [Sent() for _ in range(4)]
    claimed = [await sweep(store, sent, batch_limit=1, bulk_backlog=5) for sent in passes]
    assert claimed == [5, 5, 2, 0]  # each claimed once within the lease, oldest change first
    assert [pid for sent in passes for pid in sent.pending] == [f"b{n:02}" for n in range(12)]
