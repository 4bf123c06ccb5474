"""The sweeper on a real store: what a sweep reads, and what it re-enqueues."""

import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest

from adapters.store.profiles import ProfileStore
from schemas.profile import Profile
from tests.conftest import HASHER
from tests.support.commands import CommandCounts
from workers.sync.sweeper import Target, sweep_once

TARGETS = ("mailchimp", "klaviyo", "sendgrid")


class Actors:
    """Stands in for the sync actors' queues: the store's side of a sweep is what is under test here."""

    def __init__(self) -> None:
        self.urgent: list[tuple[str, str]] = []
        self.sent_alone: list[tuple[str, str]] = []
        self.sync_urgent = SimpleNamespace(send=lambda profile_id, esp: self.urgent.append((profile_id, esp)))

    async def alone(self, profile_ids: list[str], esp: str) -> None:
        self.sent_alone += [(pid, esp) for pid in profile_ids]


@pytest.fixture
async def counted(mongo_uri):
    commands = CommandCounts()
    store = ProfileStore.connect(mongo_uri, "sweep" + uuid.uuid4().hex[:8], HASHER, event_listeners=[commands])
    await store.ensure_indexes(TARGETS)
    yield store, commands
    await store.client.drop_database(store.profiles.database.name)
    await store.close()


async def sweep(store: ProfileStore, actors: Actors, backlog: dict[str, int]) -> int:
    actors.urgent, actors.sent_alone = [], []
    return await sweep_once(store, actors, dict.fromkeys(TARGETS, Target(batch_limit=500)), grace=timedelta(0),
                            lease=timedelta(seconds=60), counted=backlog.__setitem__)


async def test_an_idle_sweep_reads_once_a_target_and_a_pending_profile_is_still_swept(counted):
    store, commands = counted
    actors, backlog = Actors(), {}
    commands.counts.clear()
    assert await sweep(store, actors, backlog) == 0
    assert list(commands.counts.elements()) == ["find"] * len(TARGETS)
    assert backlog == dict.fromkeys(TARGETS, 0)

    # A consent change pending at Klaviyo only: swept there, urgently, and nowhere else.
    profile = Profile(id="p1", email="a@example.com")
    assert await store.save(profile, None, {"klaviyo": ({"m": 1}, "h1")}, urgent=True)
    assert await sweep(store, actors, backlog) == 1
    assert actors.urgent == [("p1", "klaviyo")]
    assert backlog == {"mailchimp": 0, "klaviyo": 1, "sendgrid": 0}

    # Within the lease it is not swept again, but it is still counted as waiting.
    assert await sweep(store, actors, backlog) == 0
    assert actors.urgent == [] and actors.sent_alone == []
    assert backlog["klaviyo"] == 1
