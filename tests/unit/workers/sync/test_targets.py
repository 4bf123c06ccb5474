"""One sync message for the targets of a change: one round, one claim, one record; a target that
fails goes on alone (its own retries, its own dead letter). Two targets of the fake ESP, in-process."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import dramatiq
from pymongo.errors import AutoReconnect

from broker import topology
from tests.unit.workers.sync.test_actors import Harness, member
from tests.unit.workers.sync.test_rounds import Counting
from workers.profiles.resolve import handed
from workers.runtime import Runtime

TARGETS = ["one", "two"]


class TwoTargets(Harness):
    def __init__(self, tmp_path, **settings) -> None:
        path = tmp_path / "esps.json"
        path.write_text(json.dumps({name: {"kind": "fake", "api_key": f"key-{name}"} for name in TARGETS}))
        super().__init__(esp_file=str(path), **settings)
        self.outbox = Counting()

    async def _runtime(self) -> Runtime:
        rt = await super()._runtime()
        lease = timedelta(seconds=30)
        rt.leases = rt.batch_leases = dict.fromkeys(TARGETS, lease)
        return rt


def test_a_change_schedules_one_message_for_all_its_targets(fake, tmp_path):
    h = TwoTargets(tmp_path)
    asyncio.run(h.workers.sync.schedule(asyncio.run(h._runtime()), "p1", TARGETS))
    [raw] = list(h.broker.queues[topology.sync_queue(h.settings.queue_prefix)].queue)
    message = dramatiq.Message.decode(raw)
    assert message.actor_name == "sync_profile" and list(message.args) == ["p1", TARGETS]
    assert h.coalescer.started_syncs == []


def test_the_targets_of_one_message_share_one_claim_and_one_record(fake, tmp_path):
    h = TwoTargets(tmp_path)
    for esp in TARGETS:
        h.outbox.put("p1", esp, member(1))
    h.run(lambda: h.workers.sync.sync_profile.send("p1", TARGETS))
    assert h.outbox.calls == ["claim_round", "settle"]
    assert fake.requests == ["upsert", "upsert"]
    for esp in TARGETS:
        state = h.outbox.state("p1", esp)
        assert state.sent_hash == state.member_hash and not state.pending and state.sending_until is None
    assert sorted(h.coalescer.started_syncs) == [("one", "p1"), ("two", "p1")]
    assert h.dead_letters() == []


def test_the_members_a_merge_wrote_travel_with_its_message_and_the_sync_sends_them_without_a_read(fake, tmp_path):
    h = TwoTargets(tmp_path)
    for esp in TARGETS:
        h.outbox.put("p1", esp, member(1))
    members = {esp: (member(1), h.outbox.state("p1", esp).member_hash) for esp in TARGETS}
    hints = handed(members, TARGETS, {"two": {"retire": ["old@example.com"]}})
    assert list(hints) == ["one"]  # address work is read where it waits, never handed over
    hints = handed(members, TARGETS)
    asyncio.run(h.workers.sync.schedule(asyncio.run(h._runtime()), "p1", TARGETS, handed=hints))
    [raw] = list(h.broker.queues[topology.sync_queue(h.settings.queue_prefix)].queue)
    message = dramatiq.Message.decode(raw)
    assert {esp: hint[:2] for esp, hint in message.kwargs["expect"].items()} == {esp: list(pair) for esp, pair in members.items()}
    h.run(lambda: None)  # the scheduled message itself
    assert h.outbox.calls == ["claim_expected", "settle"] and fake.requests == ["upsert", "upsert"]
    for esp in TARGETS:
        state = h.outbox.state("p1", esp)
        assert state.sent_hash == state.member_hash and not state.pending and state.sending_until is None


def test_a_refusal_is_dead_lettered_per_target(fake, tmp_path):
    h = TwoTargets(tmp_path)
    for esp in TARGETS:
        h.outbox.put("p1", esp, member(1))
    fake.refuse = {"p1@example.com"}
    h.run(lambda: h.workers.sync.sync_profile.send("p1", TARGETS))
    letters = sorted((m.actor_name, m.args, m.kwargs) for m in h.dead_letters())
    assert letters == [("sync_profile", ("p1", "one"), {"alone": True}), ("sync_profile", ("p1", "two"), {"alone": True})]
    assert all(h.outbox.state("p1", esp).failed_code == "esp_rejected" for esp in TARGETS)


class FailingOnce(Counting):
    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def claim_round(self, pairs, leases):
        if self.failures:
            self.failures -= 1
            raise AutoReconnect("the store went away")
        return await super().claim_round(pairs, leases)


def test_a_failed_target_is_retried_on_its_own_message(fake, tmp_path):
    h = TwoTargets(tmp_path, retry_min_backoff_ms=10)
    h.outbox = FailingOnce()
    for esp in TARGETS:
        h.outbox.put("p1", esp, member(1))
    h.run(lambda: h.workers.sync.sync_profile.send("p1", TARGETS))
    assert fake.requests == ["upsert", "upsert"]  # each target retried alone, then sent
    assert all(not h.outbox.state("p1", esp).pending for esp in TARGETS)
    assert h.dead_letters() == []
