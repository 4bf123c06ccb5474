"""Contracts that must not drift: exported JSON Schemas, queue declarations, scrubbing."""

import json
import time
from datetime import datetime, timezone

from adapters.sentry import REDACTED, scrub
from broker import topology
from broker.publisher import encode_delivery, encode_message
from broker.setup import TopologyBroker
from schemas.delivery import Delivery
from schemas.events import EVENT_SCHEMA_VERSION
from schemas.export import DIRECTORY, render, schemas


def test_exported_json_schemas_match_the_models():
    for name, document in schemas().items():
        path = DIRECTORY / name
        assert path.exists(), f"{name} missing: run `make schemas`"
        assert path.read_text() == render(document), f"{name} drifted from the models: run `make schemas`"


def test_event_schema_lists_every_event_type():
    document = json.loads((DIRECTORY / f"event.v{EVENT_SCHEMA_VERSION}.json").read_text())
    mapping = document["discriminator"]["mapping"]
    assert set(mapping) == {
        "customer.identified", "customer.updated", "order.completed", "checkout.started",
        "checkout.updated", "product.viewed", "consent.changed", "email.opened", "email.clicked", "customer.erased",
    }


def test_older_published_schema_versions_are_kept():
    assert (DIRECTORY / "event.v1.0.json").exists() and (DIRECTORY / "profile.v1.0.json").exists()


def test_dramatiq_declares_every_queue_from_the_topology():
    broker = TopologyBroker(url="amqp://guest:guest@127.0.0.1:1/", middleware=[])
    for queue in topology.all_queues("x"):
        for name, arguments in topology.declarations(queue):
            assert broker._build_queue_arguments(name) == arguments
    assert topology.queue_arguments(topology.events_queue("x"))["x-queue-type"] == "quorum"
    assert "x-max-priority" not in topology.queue_arguments(topology.sync_queue("x"))  # quorum queues before 4.0 have none


def test_encoded_message_is_a_dramatiq_message():
    import dramatiq

    message_id, body = encode_message("x.events", "process_event", ({"a": 2**63 - 1},))
    decoded = dramatiq.Message.decode(body)
    assert decoded.message_id == message_id
    assert decoded.args == ({"a": 2**63 - 1},) or decoded.args == [{"a": 2**63 - 1}]


def test_scrub_removes_emails_anywhere_and_pii_keys():
    event = {"exception": {"values": [{"value": "bad address bob@biller.com"}]},
             "contexts": {"dramatiq": {"data": {"args": [{"payload": {"x": 1}, "note": "mail jo@x.io"}]}}},
             "extra": {"email": "no-at-sign", "count": 3}}
    cleaned = json.dumps(scrub(event))
    assert "@" not in cleaned
    assert "no-at-sign" not in cleaned
    assert '"count": 3' in cleaned
    assert cleaned.count(REDACTED) == 4


def test_secrets_never_appear_in_the_settings_repr(monkeypatch):
    from adapters.settings import Settings

    monkeypatch.setenv("MERGETAG_SHOPIFY_SECRETS", "shh-one,shh-two")
    monkeypatch.setenv("MERGETAG_TRACKING_WRITE_KEYS", "wk-secret")
    monkeypatch.setenv("MERGETAG_SOURCES", json.dumps({"crm": {"scheme": "stripe", "secrets": ["whsec_hidden"], "preset": "stripe"}}))
    settings = Settings()
    text = repr(settings) + str(settings.model_dump())
    for secret in ("shh-one", "shh-two", "wk-secret", "whsec_hidden"):
        assert secret not in text
    assert settings.all_shopify_secrets() == ["shh-one", "shh-two"]


def test_events_of_an_older_minor_version_still_validate():
    """Schema evolution: a 1.0 event (no 1.1 fields) is still a valid event."""
    from schemas.events import EventAdapter

    v10 = {"schema_version": "1.0", "type": "order.completed", "event_id": "e", "source": "shopify",
           "event_time": "2024-01-01T00:00:00Z", "received_at": "2024-01-01T00:00:00Z",
           "identity": {"email": "a@example.com"}, "order_id": "1", "total": "5.00"}
    event = EventAdapter.validate_python(v10)
    assert event.schema_version == "1.0" and event.cancelled is False and event.context is None
    old = json.loads((DIRECTORY / "event.v1.0.json").read_text())
    new = json.loads((DIRECTORY / f"event.v{EVENT_SCHEMA_VERSION}.json").read_text())
    # Minor versions only add optional fields: every required field of 1.0 is still required, nothing more.
    for name, definition in old["$defs"].items():
        if "required" in definition and name in new["$defs"]:
            assert set(new["$defs"][name].get("required", [])) == set(definition["required"]), name


def test_an_encoded_delivery_is_the_dramatiq_message_of_its_json_dump():
    import dramatiq

    delivery = Delivery(source="shopify", topic="customers/update", delivery_id="w-1", dedup_key="k", meta={"shop": "ü"},
                        received_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
                        payload={"email": "a@example.com", "n": 2**63 - 1, "x": 1.5, "nested": [{"é": None}]})
    message_id, body = encode_delivery("x.events", delivery)
    decoded = dramatiq.Message.decode(body)
    assert (decoded.queue_name, decoded.actor_name, decoded.message_id) == ("x.events", "process_event", message_id)
    assert decoded.args == (delivery.model_dump(mode="json"),)
    assert (decoded.kwargs, decoded.options) == ({}, {})
    assert Delivery.model_validate(decoded.args[0]) == delivery
    assert abs(decoded.message_timestamp - time.time() * 1000) < 60_000


def test_a_delivery_holding_a_lone_surrogate_is_encoded_escaped():
    import dramatiq

    delivery = Delivery(source="tracking", topic="identify", delivery_id="m-\ud800", received_at=datetime.now(timezone.utc),
                        payload={"traits": {"first_name": "Ada\ud800"}})
    message_id, body = encode_delivery("x.events", delivery)
    assert dramatiq.Message.decode(body).args == (delivery.model_dump(mode="json"),)
