"""Signature schemes, as pure functions. Every comparison is constant-time, every
secret of a rotation is tried, and a signed timestamp outside the tolerance is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from adapters.sources.base import Rejected

ALGORITHMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


def _any_match(candidates: Sequence[bytes], given: Sequence[bytes]) -> bool:
    # Evaluate every pair: the time taken does not depend on which (if any) matched.
    results = [hmac.compare_digest(c, g) for c in candidates for g in given]
    return any(results)


def check_timestamp(timestamp: str | None, now: float, tolerance: float) -> int:
    if not timestamp:
        raise Rejected(401, "missing_timestamp")
    try:
        value = int(timestamp)
    except ValueError:
        raise Rejected(401, "invalid_timestamp") from None
    if abs(now - value) > tolerance:
        raise Rejected(401, "timestamp_out_of_tolerance", f"more than {int(tolerance)}s away from now")
    return value


def standard_webhooks(
    msg_id: str | None, timestamp: str | None, signature: str | None, body: bytes,
    secrets: Sequence[str], now: float, tolerance: float = 300,
) -> None:
    """Standard Webhooks v1: HMAC-SHA256 over ``id.timestamp.body``, keyed by the base64 after ``whsec_``."""
    if not msg_id or not signature:
        raise Rejected(401, "missing_signature")
    ts = check_timestamp(timestamp, now, tolerance)
    content = f"{msg_id}.{ts}.".encode() + body
    expected = []
    for secret in secrets:
        key = base64.b64decode(secret.removeprefix("whsec_"))
        expected.append(base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()))
    given = [part.split(",", 1)[1].encode() for part in signature.split() if part.startswith("v1,")]
    if not _any_match(expected, given):
        raise Rejected(401, "invalid_signature")


def stripe(header_value: str | None, body: bytes, secrets: Sequence[str], now: float, tolerance: float = 300) -> None:
    """``Stripe-Signature: t=..,v1=..``: HMAC-SHA256 hex over ``t.body``, keyed by the secret string as given."""
    if not header_value:
        raise Rejected(401, "missing_signature")
    pairs = [item.split("=", 1) for item in header_value.split(",") if "=" in item]
    timestamps = [v for k, v in pairs if k.strip() == "t"]
    ts = check_timestamp(timestamps[0] if timestamps else None, now, tolerance)
    content = f"{ts}.".encode() + body
    expected = [hmac.new(s.encode(), content, hashlib.sha256).hexdigest().encode() for s in secrets]
    given = [v.strip().encode() for k, v in pairs if k.strip() == "v1"]
    if not _any_match(expected, given):
        raise Rejected(401, "invalid_signature")


def plain_hmac(
    header_value: str | None, content: bytes, secrets: Sequence[str], *,
    algorithm: str = "sha256", encoding: str = "hex", prefix: str = "",
) -> None:
    """A configurable HMAC over ``content``: algorithm, hex or base64, optional prefix (``sha256=``)."""
    if not header_value:
        raise Rejected(401, "missing_signature")
    digest = ALGORITHMS[algorithm]
    given = header_value.strip()
    if prefix:
        if not given.startswith(prefix):
            raise Rejected(401, "invalid_signature")
        given = given[len(prefix):]
    expected = []
    for secret in secrets:
        mac = hmac.new(secret.encode(), content, digest).digest()
        expected.append((mac.hex() if encoding == "hex" else base64.b64encode(mac).decode()).encode())
    candidates = [given.lower().encode()] if encoding == "hex" else [given.encode()]
    if not _any_match(expected, candidates):
        raise Rejected(401, "invalid_signature")
