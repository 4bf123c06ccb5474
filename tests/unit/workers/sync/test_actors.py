"""The sync's actors in-process: a stub broker, a fake ESP (a fourth ESP added as one folder plus one
registry line, ``tests/support/fake_esp``) and an in-memory outbox. Milliseconds, no service; the
same paths run against RabbitMQ, MongoDB and the vendor sandboxes in ``tests/system``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import dq_name, xq_name
from dramatiq.middleware import AsyncIO
from pymongo.errors import AutoReconnect

from adapters.esps import registry
from adapters.settings import Settings
from broker import topology
from tests.support import fake_esp
from tests.support.outbox import FakeCoalescer, FakeOutbox, FakeReceipts, FakeStore
from workers import app
from workers.runtime import Runtime

TARGET = "fake"


class Broker(StubBroker):
    """The stub broker, keeping what goes to a dead-letter queue (``.XQ``) aside, as RabbitMQ does."""

    def __init__(self) -> None:
        super().__init__(middleware=[AsyncIO()])
        self.dead_lettered: list[dramatiq.Message] = []

    def enqueue(self, message: dramatiq.Message, *, delay: int | None = None) -> dramatiq.Message:
        if message.queue_name.endswith(".XQ"):
            self.dead_lettered.append(message)
            return message
        return super().enqueue(message, delay=delay)


class Harness:
    """The composition root's actors on a stub broker, with a runtime of fakes, and a worker to drain them."""

    def __init__(self, **settings: Any) -> None:
        self.settings = Settings(esps=[TARGET], identity_hash_keys="unit-test-secret-0123456789", **settings)
        self.outbox = FakeOutbox()
        self.receipts = FakeReceipts()
        self.coalescer = FakeCoalescer()
        self.broker = Broker()
        self.broker.emit_after("process_boot")
        self.workers = app.build(self.settings, broker=self.broker, runtime=self._runtime)

    async def _runtime(self) -> Runtime:
        lease = timedelta(seconds=30)
        return Runtime(settings=self.settings, store=FakeStore(self.outbox), esps=registry.clients(self.settings), mappings={},
                       quarantine=None, rules=None, geo=None, blocked=frozenset(), coalescer=self.coalescer, guards={},
                       leases={TARGET: lease}, batch_leases={TARGET: lease}, hasher=self.settings.hasher(),
                       receipts=self.receipts, dead_letters=None)

    def run(self, send: Any) -> None:
        """Send one message and drain the sync queue (and what the actors put back on it)."""
        send()
        queues = set(topology.sync_queues(self.settings.queue_prefix))
        worker = dramatiq.Worker(self.broker, queues=queues, worker_timeout=10)
        worker.start()
        try:
            while any(self.broker.queues[q].unfinished_tasks or self.broker.queues[dq_name(q)].unfinished_tasks
                      for q in queues if q in self.broker.queues):
                for queue in queues & set(self.broker.queues):
                    self.broker.join(queue, fail_fast=True)
            worker.join()
        finally:
            worker.stop()

    def dead_letters(self) -> list[dramatiq.Message]:
        assert {m.queue_name for m in self.broker.dead_lettered} <= {xq_name(q) for q in topology.sync_queues(self.settings.queue_prefix)}
        return self.broker.dead_lettered


def member(n: int) -> dict[str, Any]:
    return {"email": f"p{n}@example.com", "fields": {"first_name": f"P{n}"}, "unsubscribed": False}


def test_a_change_is_sent_once_and_recorded_and_a_second_sync_finds_nothing_to_send(fake):
    h = Harness()
    h.outbox.put("p1", TARGET, member(1))
    h.run(lambda: h.workers.sync.sync_profile.send("p1", TARGET))
    h.run(lambda: h.workers.sync.sync_profile.send("p1", TARGET))
    assert fake.contacts == {"p1@example.com": member(1)} and fake.requests == ["upsert"]
    state = h.outbox.state("p1", TARGET)
    assert state.sent_hash == state.member_hash and not state.pending and state.sending_until is None


def test_without_sync_rounds_a_backlog_rides_along_in_one_bulk_request(fake):
    h = Harness(sync_round_max=0)
    for n in range(25):
        h.outbox.put(f"p{n}", TARGET, member(n))
    h.run(lambda: h.workers.sync.sync_profile.send("p0", TARGET))
    assert fake.requests == ["batch"] and len(fake.contacts) == 25
    assert not any(h.outbox.state(f"p{n}", TARGET).pending for n in range(25))


def test_with_sync_rounds_a_middling_backlog_is_sent_by_each_profiles_own_sync_not_taken_along(fake):
    h = Harness()
    for n in range(25):
        h.outbox.put(f"p{n}", TARGET, member(n))
    h.run(lambda: h.workers.sync.sync_profile.send("p0", TARGET))
    assert fake.requests == ["upsert"] and list(fake.contacts) == ["p0@example.com"]
    assert not h.outbox.state("p0", TARGET).pending and all(h.outbox.state(f"p{n}", TARGET).pending for n in range(1, 25))


def test_at_the_bulk_threshold_a_sync_leaves_its_profile_to_the_sweeper(fake):
    h = Harness(sync_bulk_backlog=10)
    for n in range(12):
        h.outbox.put(f"p{n}", TARGET, member(n))
    h.run(lambda: h.workers.sync.sync_profile.send("p0", TARGET))
    assert fake.requests == [] and h.outbox.state("p0", TARGET).pending
    h.run(lambda: h.workers.sync.sync_batch.send([f"p{n}" for n in range(12)], TARGET))
    assert fake.requests == ["batch"] and len(fake.contacts) == 12


def test_a_member_refused_in_a_batch_is_recorded_and_dead_lettered_alone(fake):
    h = Harness(sync_round_max=0)  # a sync takes the backlog along in one batch
    for n in range(25):
        h.outbox.put(f"p{n}", TARGET, member(n))
    fake.refuse = {"p7@example.com"}
    h.run(lambda: h.workers.sync.sync_profile.send("p0", TARGET))
    assert len(fake.contacts) == 24 and h.outbox.state("p7", TARGET).failed_code == "esp_rejected"
    letters = h.dead_letters()
    assert [(m.actor_name, m.args, m.kwargs) for m in letters] == [("sync_profile", ("p7", TARGET), {"alone": True})]
    assert letters[0].options["dead_letter"]["code"] == "esp_rejected"


def test_address_work_swept_into_a_batch_goes_alone_at_once(fake):
    """It used to keep the batch's lease (up to 325 s), so its own send found it busy and was parked until then."""
    h = Harness()
    for n in range(25):
        h.outbox.put(f"p{n}", TARGET, member(n))
    fake.contacts = {"old@example.com": member(99)}
    h.outbox.put("p25", TARGET, member(25), retire=["old@example.com"])
    h.run(lambda: h.workers.sync.sync_batch.send([f"p{n}" for n in range(26)], TARGET))
    assert h.outbox.parked == [] and h.outbox.state("p25", TARGET).retire == []
    assert not any(h.outbox.state(f"p{n}", TARGET).pending for n in range(26))


class RestartingStore(FakeOutbox):
    """The store stops while a batch's outcome is being recorded (the ESP already holds the batch)."""

    failures = 1

    async def settle_many(self, esp, token, sent, failed, released, jobs=None) -> None:
        if sent and self.failures:
            self.failures -= 1
            raise AutoReconnect("connection closed")
        await super().settle_many(esp, token, sent, failed, released, jobs)


def test_a_store_failure_recording_a_batch_leaves_its_profiles_to_the_retry(fake):
    h = Harness()
    h.outbox = RestartingStore()
    ids = [f"p{n}" for n in range(25)]
    for n, pid in enumerate(ids):
        h.outbox.put(pid, TARGET, member(n))
    h.run(lambda: h.workers.sync.sync_batch.send(ids, TARGET))  # fails recording: the broker would retry it
    assert h.outbox.failures == 0 and fake.requests == ["batch"]
    assert all(h.outbox.state(pid, TARGET).sending_until is None for pid in ids)  # no lease left to nobody
    h.run(lambda: h.workers.sync.sync_batch.send(ids, TARGET))  # the retry sends them again and records it
    assert fake.requests == ["batch", "batch"] and not any(h.outbox.state(pid, TARGET).pending for pid in ids)


def test_an_erasure_deletes_every_address_then_reads_back_that_none_is_left(fake):
    h = Harness()
    fake.contacts = {"old@example.com": member(0), "new@example.com": member(1)}
    h.outbox.put("p1", TARGET, None, erase=["new@example.com", "old@example.com"])
    h.run(lambda: h.workers.sync.sync_urgent.send("p1", TARGET))
    assert fake.contacts == {}
    assert [status for _, _, status in h.receipts.marks] == ["deleted", "verified"]
    state = h.outbox.state("p1", TARGET)
    assert state.erase == [] and state.verify == [] and not state.pending


def test_address_work_waits_for_every_send_that_may_still_write_a_contact(fake):
    h = Harness()
    fake.contacts = {"old@example.com": member(0)}
    h.outbox.put("p1", TARGET, None, erase=["old@example.com"])
    # A profile merged into this one was mid-send: its lease is carried over as a fence.
    h.outbox.states[("p1", TARGET)]["fence_until"] = datetime.now(timezone.utc) + timedelta(seconds=30)
    h.run(lambda: h.workers.sync.sync_urgent.send("p1", TARGET))
    assert "old@example.com" in fake.contacts and h.outbox.parked == ["p1"] and h.receipts.marks == []
    # Then only its bulk job, still running at the ESP.
    h.outbox.states[("p1", TARGET)].update(fence_until=None, jobs=["job-1"])
    fake.running = {"job-1"}
    h.run(lambda: h.workers.sync.sync_urgent.send("p1", TARGET))
    assert "old@example.com" in fake.contacts and h.outbox.parked == ["p1", "p1"]
    fake.running = set()
    h.run(lambda: h.workers.sync.sync_urgent.send("p1", TARGET))
    assert fake.contacts == {} and h.outbox.state("p1", TARGET).jobs == []
    assert [status for _, _, status in h.receipts.marks] == ["deleted", "verified"]


def test_the_fourth_esp_is_one_folder_and_one_registry_line(fake):
    targets = Settings(esps=[TARGET]).esp_targets()
    assert targets[TARGET].kind == fake_esp.KIND and targets[TARGET].fields == fake_esp.DEFAULT_FIELDS
    assert registry.descriptor(TARGET).lease(10, 300, bulk=True) == 2 * 10 + 5 + 300
