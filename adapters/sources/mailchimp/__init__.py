"""Mailchimp webhooks: engagement and consent flowing back from the ESP.

Two formats arrive at ``/webhooks/mailchimp``, each authenticated the way it can be:

- Mailchimp Transactional (Mandrill) event webhooks, form field ``mandrill_events``
  (opens, clicks, unsubscribes): ``X-Mandrill-Signature`` = base64(HMAC-SHA1(webhook
  key, the webhook URL followed by each POST key and value, keys sorted)).
- Mailchimp Marketing audience webhooks (``type=unsubscribe|subscribe|cleaned``):
  Mailchimp does not sign them, so the URL carries a secret (``?key=...``),
  compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl

from adapters.sources.base import Inbound, Rejected, WebhookSource, content_id, header, json_value, validate_events
from adapters.sources.mapped import as_time, context
from schemas.delivery import Delivery
from schemas.errors import EventInvalid
from schemas.events import Event

NAME = "mailchimp"
MARKETING_CONSENT = {"unsubscribe": "unsubscribed", "cleaned": "unsubscribed", "subscribe": "subscribed"}


def mandrill_signature(key: str, url: str, params: Sequence[tuple[str, str]]) -> str:
    signed = url + "".join(k + v for k, v in sorted(params))
    return base64.b64encode(hmac.new(key.encode(), signed.encode(), hashlib.sha1).digest()).decode()


class MailchimpSource(WebhookSource):
    """Parameters:
      url_secrets: accepted ``?key=`` values for audience webhooks.
      mandrill_keys: Mandrill webhook keys.
      mandrill_url: the URL exactly as registered with Mandrill (it is signed); defaults to the request's.
    """

    name = NAME

    def __init__(self, url_secrets: Sequence[str], mandrill_keys: Sequence[str], mandrill_url: str | None = None) -> None:
        self._url_secrets = [s.encode() for s in url_secrets]
        self._mandrill_keys = list(mandrill_keys)
        self._mandrill_url = mandrill_url

    def accept(self, inbound: Inbound) -> list[Delivery]:
        try:
            text = inbound.body.decode()
            # Strict: an escape of bytes that are not UTF-8 (``%ED%A0%80``) is refused, not turned into U+FFFD.
            params = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(inbound.body), errors="strict")
        except UnicodeDecodeError:
            raise Rejected(400, "invalid_unicode", "the form is not valid Unicode text (UTF-8)") from None
        except ValueError:
            raise Rejected(400, "malformed_form") from None
        form = dict(params)
        if "mandrill_events" in form:
            return self._mandrill(inbound, params, form["mandrill_events"])
        return self._marketing(inbound, form)

    def _mandrill(self, inbound: Inbound, params: list[tuple[str, str]], raw: str) -> list[Delivery]:
        given = header(inbound.headers, "X-Mandrill-Signature")
        if not given:
            raise Rejected(401, "missing_signature")
        url = self._mandrill_url or inbound.url
        expected = [mandrill_signature(k, url, params).encode() for k in self._mandrill_keys]
        if not any([hmac.compare_digest(e, given.encode()) for e in expected]):
            raise Rejected(401, "invalid_signature")
        events = json_value(raw)
        if not isinstance(events, list):
            raise Rejected(400, "invalid_payload", "mandrill_events must be a JSON array")
        # One bad item never costs the batch its good ones: it travels on and is quarantined with its reason.
        deliveries = []
        for event in events:
            payload = event if isinstance(event, dict) else {"item": event}
            key = f"{payload.get('_id') or content_id(payload)}:{payload.get('event')}:{payload.get('ts')}"
            deliveries.append(Delivery(source=NAME, topic=f"mandrill.{payload.get('event') or 'unknown'}", delivery_id=key,
                                       dedup_key=f"{NAME}:{key}", received_at=inbound.received_at, payload=payload))
        return deliveries

    def _marketing(self, inbound: Inbound, form: dict[str, str]) -> list[Delivery]:
        given = (inbound.query.get("key") or "").encode()
        if not given:
            raise Rejected(401, "missing_signature", "audience webhooks carry their secret as ?key=")
        if not any([hmac.compare_digest(given, s) for s in self._url_secrets]):
            raise Rejected(401, "invalid_signature")
        kind = form.get("type")
        if not kind:
            raise Rejected(400, "missing_event_type")
        if kind not in MARKETING_CONSENT:
            return []
        key = f"{kind}:{form.get('data[id]') or form.get('data[email]')}:{form.get('fired_at')}"
        return [Delivery(source=NAME, topic=f"audience.{kind}", delivery_id=hashlib.sha256(key.encode()).hexdigest()[:32],
                         dedup_key=f"{NAME}:{hashlib.sha256(key.encode()).hexdigest()[:32]}",
                         received_at=inbound.received_at, payload=form)]

    status = 200

    def to_events(self, delivery: Delivery) -> list[Event]:
        return to_events(delivery)


def to_events(delivery: Delivery) -> list[Event]:
    return validate_events(_raw_events(delivery))


def _raw_events(delivery: Delivery) -> list[dict[str, Any]]:
    p, topic = delivery.payload, delivery.topic
    base = {"event_id": f"{NAME}:{delivery.delivery_id}", "source": NAME, "received_at": delivery.received_at}
    if topic.startswith("audience."):
        fired = _fired_at(p.get("fired_at"))
        return [{**base, "event_time": fired or delivery.received_at, "timed": fired is not None, "identity": {"email": p.get("data[email]")},
                 "type": "consent.changed", "channel": "email", "state": MARKETING_CONSENT[topic.split(".", 1)[1]]}]
    msg = p.get("msg") if isinstance(p.get("msg"), dict) else {}
    base |= {"event_time": as_time(p.get("ts")) or delivery.received_at, "timed": as_time(p.get("ts")) is not None,
             "identity": {"email": msg.get("email")},
             "context": context(p.get("ip"), p.get("user_agent"))}
    campaign = (msg.get("metadata") or {}).get("campaign_id") if isinstance(msg.get("metadata"), dict) else None
    kind = topic.split(".", 1)[1]
    if kind in ("open", "click", "unsub", "spam", "hard_bounce") and not p.get("_id"):
        raise EventInvalid(f"mandrill {kind}: no _id", errors=[
            {"event": kind, "loc": "_id", "type": "missing", "msg": "Mandrill events carry _id"}])
    if kind == "open":
        return [{**base, "type": "email.opened", "esp": NAME, "campaign_id": campaign}]
    if kind == "click":
        return [{**base, "type": "email.clicked", "esp": NAME, "campaign_id": campaign, "url": p.get("url")}]
    if kind in ("unsub", "spam", "hard_bounce"):
        return [{**base, "type": "consent.changed", "channel": "email", "state": "unsubscribed"}]
    return []


def _fired_at(value: str | None) -> datetime | None:
    """Mailchimp's ``fired_at`` is ``YYYY-MM-DD HH:MM:SS`` in UTC."""
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
