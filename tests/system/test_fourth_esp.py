"""A fourth ESP, added as one folder plus one registry line, synced to by the real composition root:
the runtime built from Settings on MongoDB (SecantusDB or ``MONGODB_URI``) and Redis, the actors on a
stub broker in this process. The three vendor ESPs run the same path over RabbitMQ in the other tests here."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from unittest import mock

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AsyncIO
from pymongo import MongoClient

from adapters.esps import registry
from adapters.settings import Settings
from schemas.delivery import Delivery
from tests.support import fake_esp
from tests.support.fake_esp import FakeEsp
from tests.support.samples import customer
from workers import app


def test_a_customer_reaches_the_fourth_esp_through_merge_and_sync(mongo_uri):
    registry.register(fake_esp.DESCRIPTOR)
    FakeEsp.contacts, FakeEsp.requests, FakeEsp.refuse = {}, [], set()
    prefix = "f" + uuid.uuid4().hex[:10]
    env = {"MERGETAG_ESPS": "fake", "MERGETAG_MONGODB_URI": mongo_uri, "MERGETAG_MONGODB_DATABASE": prefix,
           "MERGETAG_QUEUE_PREFIX": prefix, "MERGETAG_IDENTITY_HASH_KEYS": "system-test-secret-0123456789",
           "MERGETAG_FAKE_FIELDS": '{"first_name": "first_name"}', "MERGETAG_FAKE_API_KEY": "fake-key", "MERGETAG_SYNC_COALESCE_MS": "50"}
    broker = StubBroker(middleware=[AsyncIO()])
    broker.emit_after("process_boot")
    worker = None
    try:
        patched = mock.patch.dict("os.environ", env)
        patched.start()
        workers = app.build(Settings(), broker=broker)
        email = f"four-{uuid.uuid4().hex[:8]}@example.com"
        delivery = Delivery(source="shopify", topic="customers/update", delivery_id=uuid.uuid4().hex,
                            received_at=datetime.now(timezone.utc), payload=customer(email, first_name="Quinn"))
        workers.profiles.process_event.send(delivery.model_dump(mode="json"))
        worker = dramatiq.Worker(broker, worker_timeout=10)
        worker.start()
        for queue in (workers.profiles.process_event.queue_name, workers.sync.queue):
            broker.join(queue, fail_fast=True)
        worker.join()
        assert FakeEsp.contacts[email]["fields"] == {"first_name": "Quinn"} and FakeEsp.requests == ["upsert"]
        doc = MongoClient(mongo_uri)[prefix].profiles.find_one({"email": email})
        assert doc["esp"]["fake"]["sent_hash"] == doc["esp"]["fake"]["member_hash"] and doc["esp"]["fake"]["pending"] is False
    finally:
        if worker is not None:
            worker.stop()
        patched.stop()
        registry.DESCRIPTORS.pop(fake_esp.KIND)
        MongoClient(mongo_uri).drop_database(prefix)
