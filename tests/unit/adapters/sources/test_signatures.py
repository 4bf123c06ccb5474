"""Every signature scheme, checked against what the senders' own libraries produce."""

import base64
import hashlib
import hmac
import time
from datetime import datetime, timezone

import pytest
import standardwebhooks
import stripe

from adapters.sources import signatures
from adapters.sources.base import Rejected

BODY = b'{"type":"contact.updated","data":{"id":1}}'
WHSEC = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
OLD_WHSEC = "whsec_" + base64.b64encode(b"fedcba9876543210fedcba9876543210").decode()


def sw_headers(secret: str, msg_id: str = "msg_1", at: float | None = None) -> tuple[str, str, str]:
    at = at or time.time()
    signature = standardwebhooks.Webhook(secret).sign(msg_id, datetime.fromtimestamp(int(at), tz=timezone.utc), BODY.decode())
    return msg_id, str(int(at)), signature


def test_standard_webhooks_signed_by_the_reference_library_verifies():
    signatures.standard_webhooks(*sw_headers(WHSEC), BODY, [WHSEC], time.time())


def test_standard_webhooks_rotation_accepts_any_listed_secret_and_any_signature():
    msg_id, ts, sig_new = sw_headers(WHSEC)
    _, _, sig_old = sw_headers(OLD_WHSEC)
    signatures.standard_webhooks(msg_id, ts, sig_old, BODY, [WHSEC, OLD_WHSEC], time.time())
    signatures.standard_webhooks(msg_id, ts, f"{sig_old} {sig_new}", BODY, [WHSEC], time.time())


@pytest.mark.parametrize("skew", [-301, 301])
def test_standard_webhooks_refuses_stale_or_future_timestamps(skew):
    now = time.time()
    with pytest.raises(Rejected) as exc:
        signatures.standard_webhooks(*sw_headers(WHSEC, at=now + skew), BODY, [WHSEC], now)
    assert exc.value.code == "timestamp_out_of_tolerance"


def test_standard_webhooks_tampered_body_or_id_fails():
    msg_id, ts, sig = sw_headers(WHSEC)
    with pytest.raises(Rejected):
        signatures.standard_webhooks(msg_id, ts, sig, BODY + b" ", [WHSEC], time.time())
    with pytest.raises(Rejected):
        signatures.standard_webhooks("msg_2", ts, sig, BODY, [WHSEC], time.time())


def test_stripe_signed_by_stripe_library_verifies_and_keeps_tolerance():
    secret = "whsec_test"
    header = stripe.WebhookSignature.generate_signature_header(BODY.decode(), secret)
    signatures.stripe(header, BODY, ["other", secret], time.time())
    stale = stripe.WebhookSignature.generate_signature_header(BODY.decode(), secret, timestamp=int(time.time()) - 400)
    with pytest.raises(Rejected) as exc:
        signatures.stripe(stale, BODY, [secret], time.time())
    assert exc.value.code == "timestamp_out_of_tolerance"
    with pytest.raises(Rejected) as exc:
        signatures.stripe(header, BODY, ["not-it"], time.time())
    assert exc.value.code == "invalid_signature"


def test_stripe_and_standard_webhooks_differ_for_the_same_secret():
    """Same ``whsec_`` string, different keys: Stripe uses the text, Standard Webhooks its base64."""
    header = stripe.WebhookSignature.generate_signature_header(BODY.decode(), WHSEC)
    ts = header.split(",")[0].split("=")[1]
    v1 = header.split("v1=")[1]
    with pytest.raises(Rejected):
        signatures.standard_webhooks("msg_1", ts, f"v1,{base64.b64encode(bytes.fromhex(v1)).decode()}", BODY, [WHSEC], time.time())


@pytest.mark.parametrize(("algorithm", "encoding", "prefix"), [("sha256", "hex", "sha256="), ("sha1", "base64", ""), ("sha512", "hex", "")])
def test_plain_hmac_by_configuration(algorithm, encoding, prefix):
    mac = hmac.new(b"k2", BODY, getattr(hashlib, algorithm)).digest()
    value = prefix + (mac.hex() if encoding == "hex" else base64.b64encode(mac).decode())
    signatures.plain_hmac(value, BODY, ["k1", "k2"], algorithm=algorithm, encoding=encoding, prefix=prefix)
    with pytest.raises(Rejected):
        signatures.plain_hmac(value, BODY, ["k1"], algorithm=algorithm, encoding=encoding, prefix=prefix)
    with pytest.raises(Rejected):
        signatures.plain_hmac(None, BODY, ["k2"], algorithm=algorithm, encoding=encoding, prefix=prefix)
