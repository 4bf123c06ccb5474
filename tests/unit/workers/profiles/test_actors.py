"""The profile actors in-process (stub broker, fakes): bad input is kept with its reason, never retried."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AsyncIO

from adapters.settings import Settings
from adapters.sources.registry import build_mappings
from workers import app
from workers.runtime import Runtime


@dataclass
class FakeQuarantine:
    kept: list[tuple[dict[str, Any], list[dict[str, Any]], list[str]]] = field(default_factory=list)

    async def put(self, delivery: dict[str, Any], errors: list[dict[str, Any]], version: str, keys: list[str]) -> str:
        self.kept.append((delivery, errors, keys))
        return f"q{len(self.kept)}"


def test_an_invalid_delivery_is_quarantined_with_its_reasons_and_nothing_is_merged():
    settings = Settings(esps=[], identity_hash_keys="unit-test-secret-0123456789")
    quarantine = FakeQuarantine()

    async def runtime() -> Runtime:
        return Runtime(settings=settings, store=None, esps={}, mappings=build_mappings(settings), quarantine=quarantine, rules=None,
                       geo=None, blocked=frozenset(), coalescer=None, guards={}, leases={}, batch_leases={}, hasher=settings.hasher(),
                       receipts=None, dead_letters=None)

    broker = StubBroker(middleware=[AsyncIO()])
    broker.emit_after("process_boot")
    workers = app.build(settings, broker=broker, runtime=runtime)
    workers.profiles.process_event.send({"source": "shopify", "topic": "customers/update", "payload": {}})
    worker = dramatiq.Worker(broker, worker_timeout=10)
    worker.start()
    try:
        broker.join(workers.profiles.process_event.queue_name, fail_fast=True)
        worker.join()
    finally:
        worker.stop()
    [(delivery, errors, keys)] = quarantine.kept
    assert delivery["topic"] == "customers/update" and keys == []
    assert {e["loc"] for e in errors} >= {"delivery_id", "received_at"}
