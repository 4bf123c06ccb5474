"""What ends mailing a person, whichever ESP reports it: unsubscribes, spam complaints, cleaned
addresses and hard bounces all become an unsubscribe (which then reaches every address)."""

from datetime import datetime, timezone

from adapters.sources import mailchimp, sendgrid
from schemas.delivery import Delivery
from schemas.events import ConsentChanged

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def sendgrid_event(kind: str, **extra) -> Delivery:
    payload = {"event": kind, "email": "a@example.com", "timestamp": 1767225600, "sg_event_id": f"sg-{kind}", **extra}
    return Delivery(source="sendgrid", topic=kind, delivery_id=f"sg-{kind}", received_at=NOW, payload=payload)


def test_sendgrid_hard_bounces_unsubscribe_and_soft_blocks_do_not():
    for kind, extra in (("unsubscribe", {}), ("spamreport", {}), ("bounce", {"type": "bounce"}), ("bounce", {})):
        (event,) = sendgrid.to_events(sendgrid_event(kind, **extra))
        assert isinstance(event, ConsentChanged) and event.state == "unsubscribed" and event.timed
    assert sendgrid.to_events(sendgrid_event("bounce", type="blocked")) == []


def test_mandrill_hard_bounces_unsubscribe_and_soft_ones_do_not():
    def mandrill(kind: str) -> Delivery:
        payload = {"event": kind, "_id": f"m-{kind}", "ts": 1767225600, "msg": {"email": "a@example.com"}}
        return Delivery(source="mailchimp", topic=f"mandrill.{kind}", delivery_id=f"m-{kind}", received_at=NOW, payload=payload)

    (event,) = mailchimp.to_events(mandrill("hard_bounce"))
    assert isinstance(event, ConsentChanged) and event.state == "unsubscribed"
    assert mailchimp.to_events(mandrill("soft_bounce")) == []


def test_events_without_a_time_of_their_own_say_so():
    (timed,) = sendgrid.to_events(sendgrid_event("unsubscribe"))
    untimed_payload = {"event": "unsubscribe", "email": "a@example.com", "sg_event_id": "sg-x"}
    (untimed,) = sendgrid.to_events(Delivery(source="sendgrid", topic="unsubscribe", delivery_id="sg-x", received_at=NOW,
                                             payload=untimed_payload))
    assert timed.timed and not untimed.timed and untimed.event_time == NOW


def test_a_configured_sender_can_map_an_event_to_an_erasure():
    from adapters.sources.configured import SourceConfig, configured_mapping
    from schemas.events import CustomerErased

    config = SourceConfig.model_validate({"scheme": "hmac", "secrets": ["s"], "mapping": {"contact.forget": {
        "event": "customer.erased", "email": "data.email", "customer_id": "data.id", "event_time": "data.at"}}})
    delivery = Delivery(source="crm", topic="contact.forget", delivery_id="d1", dedup_key="crm:d1", received_at=NOW,
                        payload={"data": {"email": "A@Example.com", "id": 7, "at": "2026-01-01T00:00:00Z"}})
    (event,) = configured_mapping("crm", config)(delivery)
    assert isinstance(event, CustomerErased)
    assert event.identity.email == "a@example.com" and event.identity.customer_id == "7" and event.source == "crm"
