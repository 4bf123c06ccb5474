"""SendGrid Event Webhook: opens, clicks and unsubscribes flowing back from the ESP.

Verified as SendGrid signs it (Signed Event Webhook): an ECDSA P-256 / SHA-256
signature, base64 DER in ``X-Twilio-Email-Event-Webhook-Signature``, over the
timestamp header followed by the raw body, checked against the account's public
key(s); the timestamp must be within the tolerance.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from adapters.sources.base import Inbound, Rejected, WebhookSource, content_id, header, json_value, validate_events
from adapters.sources.mapped import as_time, context
from adapters.sources.signatures import check_timestamp
from schemas.delivery import Delivery
from schemas.errors import EventInvalid
from schemas.events import Event

NAME = "sendgrid"
SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
UNSUBSCRIBES = {"unsubscribe", "group_unsubscribe", "spamreport"}
# A hard bounce ("bounce" of type "bounce"; "blocked" is temporary) ends mailing the person, like an unsubscribe.


def load_key(text: str) -> ec.EllipticCurvePublicKey:
    """The verification key as SendGrid shows it: base64 DER, with or without PEM armour."""
    body = "".join(line for line in text.strip().splitlines() if "-----" not in line)
    key = load_der_public_key(base64.b64decode(body))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("SendGrid verification keys are ECDSA public keys")
    return key


class SendGridSource(WebhookSource):
    name = NAME

    def __init__(self, public_keys: Sequence[str], tolerance_s: float = 300, clock: Callable[[], float] = time.time) -> None:
        self._keys = [load_key(k) for k in public_keys]
        self._tolerance = tolerance_s
        self._clock = clock

    def accept(self, inbound: Inbound) -> list[Delivery]:
        signature, stamp = header(inbound.headers, SIGNATURE), header(inbound.headers, TIMESTAMP)
        if not signature:
            raise Rejected(401, "missing_signature")
        check_timestamp(stamp, self._clock(), self._tolerance)
        try:
            der = base64.b64decode(signature, validate=True)
        except binascii.Error:
            raise Rejected(401, "invalid_signature") from None
        signed = (stamp or "").encode() + inbound.body
        if not any([_verifies(key, der, signed) for key in self._keys]):
            raise Rejected(401, "invalid_signature")
        events = json_value(inbound.body)
        if not isinstance(events, list):
            raise Rejected(400, "invalid_payload", "the body must be a JSON array of events")
        # One bad item never costs the batch its good ones: it travels on and is quarantined with its reason.
        deliveries = []
        for event in events:
            payload = event if isinstance(event, dict) else {"item": event}
            event_id = str(payload.get("sg_event_id") or content_id(payload))
            deliveries.append(Delivery(source=NAME, topic=str(payload.get("event") or "unknown"), delivery_id=event_id,
                                       dedup_key=f"{NAME}:{event_id}", received_at=inbound.received_at, payload=payload))
        return deliveries

    status = 200

    def to_events(self, delivery: Delivery) -> list[Event]:
        return to_events(delivery)


def _verifies(key: ec.EllipticCurvePublicKey, der: bytes, signed: bytes) -> bool:
    try:
        key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def to_events(delivery: Delivery) -> list[Event]:
    return validate_events(_raw_events(delivery))


def _raw_events(delivery: Delivery) -> list[dict[str, Any]]:
    """open -> email.opened, click -> email.clicked, unsubscribes and spam reports -> consent.
    Delivery-status events (processed, delivered, deferred...) carry no personalization and map to none."""
    e = delivery.payload
    base = {
        "event_id": f"{NAME}:{delivery.delivery_id}",
        "source": NAME,
        "event_time": as_time(e.get("timestamp")) or delivery.received_at,
        "timed": as_time(e.get("timestamp")) is not None,
        "received_at": delivery.received_at,
        "identity": {"email": e.get("email")},
        "context": context(e.get("ip"), e.get("useragent")),
    }
    campaign = e.get("singlesend_id") or e.get("marketing_campaign_id")
    kind = delivery.topic
    hard_bounce = kind == "bounce" and e.get("type", "bounce") == "bounce"
    if (kind in ("open", "click", *UNSUBSCRIBES) or hard_bounce) and not e.get("sg_event_id"):
        raise EventInvalid(f"sendgrid {kind}: no sg_event_id", errors=[
            {"event": kind, "loc": "sg_event_id", "type": "missing", "msg": "SendGrid events carry sg_event_id"}])
    if kind == "open":
        return [{**base, "type": "email.opened", "esp": NAME, "campaign_id": _str(campaign)}]
    if kind == "click":
        return [{**base, "type": "email.clicked", "esp": NAME, "campaign_id": _str(campaign), "url": e.get("url")}]
    if kind in UNSUBSCRIBES or hard_bounce:
        return [{**base, "type": "consent.changed", "channel": "email", "state": "unsubscribed"}]
    return []


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
