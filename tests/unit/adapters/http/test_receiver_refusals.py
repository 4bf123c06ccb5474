"""What the receiver refuses before anything is queued: text that is not Unicode, numbers JSON does not have,
batches over Segment's limit. Pure: each source's ``accept`` on a request built here."""

import base64
import json
from datetime import datetime, timezone
from urllib.parse import urlencode

import pytest

from adapters.sources.base import Inbound, Rejected, check_names, parse_json
from adapters.sources.mailchimp import MailchimpSource, mandrill_signature
from adapters.sources.shopify import ShopifySource, sign
from adapters.sources.tracking import MAX_BATCH, TrackingSource
from schemas.delivery import Delivery

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
KEY = "write-key"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}


def inbound(path: str, body: bytes, headers: dict | None = None, url: str = "http://receiver/x", query: dict | None = None) -> Inbound:
    return Inbound(method="POST", url=url, path=path, headers=headers or {}, body=body, received_at=NOW, query=query or {})


def refusal(call) -> tuple[int, str]:
    with pytest.raises(Rejected) as exc:
        call()
    return exc.value.status, exc.value.code


@pytest.mark.parametrize("body", [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": [-Infinity]}', b'{"a": 1e400}', b'{"a": -1e999}'])
def test_nan_infinity_and_overflowing_floats_are_invalid_numbers(body):
    assert refusal(lambda: parse_json(body)) == (400, "invalid_number")


@pytest.mark.parametrize("body", [
    b'{"messageId": "\\ud800"}',                      # a lone high surrogate escape
    b'{"a": {"b": ["ok", "x\\uDFFFy"]}}',             # a lone low one, nested, upper case
    b'{"\\udc00key": 1}',                             # in a key
    b'{"a": "\\ude00\\ud83d"}',                       # a pair in the wrong order is two lone ones
    b'{"a": "\\ud83d\\ud83d\\ude00"}',                # a lone high one before a pair
    b'{"a": "\\ud83d\\ude00\\udc00"}',                # a lone low one after a pair
    b'{"a": "\\\\ud83d\\udc00"}',                     # a lone low one after text that only looks like a high one
    '{"a": "\udcff"}'.encode("utf-8", "surrogatepass"),  # a surrogate encoded as UTF-8 bytes
    b'{"a": "\xff"}',                                 # not UTF-8 at all
    '{"a": "\\ud800"}'.encode("utf-16"),              # UTF-16 JSON is read, and checked the same way
])
def test_text_that_is_not_unicode_is_refused(body):
    assert refusal(lambda: parse_json(body)) == (400, "invalid_unicode")


def test_valid_surrogate_pairs_and_escaped_backslashes_are_kept():
    assert parse_json(b'{"a": "\\ud83d\\ude00", "b": "\\\\ud800", "c": "\\uD83D\\uDE00\\ud83d\\ude00"}') == \
        {"a": "\U0001F600", "b": "\\ud800", "c": "\U0001F600\U0001F600"}


def test_the_refusal_names_where_without_the_value():
    with pytest.raises(Rejected) as exc:
        parse_json(b'{"traits": {"first_name": "Ada\\ud800 secret"}}')
    assert "traits.first_name" in exc.value.detail and "Ada" not in exc.value.detail


def tracking(body: dict | bytes, call: str = "batch") -> list[Delivery]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return TrackingSource([KEY]).accept(inbound(f"/v1/{call}", raw, AUTH))


def test_tracking_refuses_a_lone_surrogate_message_id_and_nan_properties():
    assert refusal(lambda: tracking(b'{"userId": "u", "messageId": "\\ud800"}', "identify")) == (400, "invalid_unicode")
    assert refusal(lambda: tracking(b'{"userId": "u", "event": "Order Completed", "properties": {"total": NaN}}', "track")) \
        == (400, "invalid_number")


def test_tracking_batch_holds_at_most_2500_messages():
    item = {"type": "identify", "userId": "u"}
    assert len(tracking({"batch": [item] * MAX_BATCH})) == MAX_BATCH == 2_500
    with pytest.raises(Rejected) as exc:
        tracking({"batch": [item] * (MAX_BATCH + 1)})
    assert (exc.value.status, exc.value.code) == (400, "batch_too_large")
    assert "2500" in exc.value.detail and "2501" in exc.value.detail


def test_shopify_refuses_a_lone_surrogate_in_a_signed_body():
    body = b'{"id": 1, "email": "a@example.com", "first_name": "\\udbff"}'
    headers = {"X-Shopify-Hmac-Sha256": sign(body, "s"), "X-Shopify-Topic": "customers/update", "X-Shopify-Webhook-Id": "w"}
    assert refusal(lambda: ShopifySource(["s"]).accept(inbound("/webhooks/shopify", body, headers))) == (400, "invalid_unicode")


def mandrill(events: str) -> list[Delivery]:
    params = [("mandrill_events", events)]
    url = "http://receiver/webhooks/mailchimp"
    headers = {"X-Mandrill-Signature": mandrill_signature("mk", url, params)}
    return MailchimpSource([], ["mk"]).accept(inbound("/webhooks/mailchimp", urlencode(params).encode(), headers, url))


def test_mandrill_events_are_checked_like_any_json_body():
    assert refusal(lambda: mandrill('[{"event": "open", "_id": "\\ud800"}]')) == (400, "invalid_unicode")
    assert refusal(lambda: mandrill('[{"event": "open", "ts": NaN}]')) == (400, "invalid_number")
    assert len(mandrill('[{"event": "open", "_id": "m1", "ts": 1}]')) == 1


def test_mailchimp_forms_with_escapes_of_bytes_that_are_not_utf8_are_refused():
    source = MailchimpSource(["k"], [])
    body = b"type=unsubscribe&fired_at=2026-01-01+00%3A00%3A00&data%5Bemail%5D=a%ED%A0%80%40example.com"
    call = lambda: source.accept(inbound("/webhooks/mailchimp", body, query={"key": "k"}))  # noqa: E731
    assert refusal(call) == (400, "invalid_unicode")
    assert refusal(lambda: source.accept(inbound("/webhooks/mailchimp", b"type=x&\xff", query={"key": "k"}))) == (400, "invalid_unicode")


def test_delivery_names_from_headers_must_be_unicode():
    # aiohttp decodes header bytes that are not UTF-8 into lone surrogates (surrogateescape).
    named = Delivery(source="shopify", topic="customers/update", delivery_id="w-\udcff", dedup_key="shopify:x", received_at=NOW, payload={})
    assert refusal(lambda: check_names([named])) == (400, "invalid_unicode")
    check_names([named.model_copy(update={"delivery_id": "w-\u00e9"})])
