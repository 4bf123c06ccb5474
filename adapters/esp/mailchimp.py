"""Mailchimp Marketing API v3: one member upsert per profile.

``PUT /lists/{list}/members/{md5(lower(email))}`` with ``status_if_new`` only,
so an existing member's consent is never overwritten; the one exception is an
unsubscribe, which is pushed as ``status: unsubscribed`` (consent wins).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any

import aiohttp

from adapters.esp.fields import MappingEntry, convert, normalize
from schemas.errors import EspRejected, EspUnavailable
from schemas.events import Scalar
from schemas.profile import Profile

NAME = "mailchimp"
ACCOUNT_ERRORS = {401, 403, 404}
BATCH_LIMIT = 500
_STATUS_IF_NEW = {
    "subscribed": "subscribed",
    "unsubscribed": "unsubscribed",
    "pending": "pending",
    "not_subscribed": "transactional",
}


def subscriber_hash(email: str) -> str:
    return hashlib.md5(email.lower().encode()).hexdigest()


def profile_values(profile: Profile, today: date | None = None) -> dict[str, Scalar]:
    """Every trait a merge field can name: the profile's own traits, then the computed ones.

    ``days_since_last_order`` and ``days_since_last_open`` are counted to ``today`` (UTC): they
    are as fresh as the member's last sync, so map them only where a daily refresh runs.
    """
    today = today or datetime.now(timezone.utc).date()
    values: dict[str, Scalar] = {name: trait.value for name, trait in profile.traits.items()}
    c = profile.computed
    values.update(
        lifetime_value=float(c.lifetime_value),
        order_count=c.order_count,
        last_order_date=c.last_order_date.date().isoformat() if c.last_order_date else None,
        loyalty_tier=c.loyalty_tier,
        categories_viewed=", ".join(c.categories_viewed) or None,
        average_order_value=float(c.average_order_value),
        top_categories=", ".join(c.top_categories) or None,
        preferred_send_hour=c.preferred_send_hour,
        last_email_open=c.last_email_open.date().isoformat() if c.last_email_open else None,
        abandoned_cart_url=c.abandoned_cart.url if c.abandoned_cart else None,
        abandoned_cart_value=float(c.abandoned_cart.value) if c.abandoned_cart else None,
        days_since_last_order=(today - c.last_order_date.date()).days if c.last_order_date else None,
        days_since_last_open=(today - c.last_email_open.date()).days if c.last_email_open else None,
    )
    return values


# Derived by mergetag alone: when one has no value, the ESP's copy is blanked rather than left stale
# (an abandoned cart must disappear from the next email once the order arrives).
COMPUTED = frozenset({
    "lifetime_value", "order_count", "last_order_date", "loyalty_tier", "categories_viewed", "average_order_value",
    "top_categories", "preferred_send_hour", "last_email_open", "abandoned_cart_url", "abandoned_cart_value",
    "days_since_last_order", "days_since_last_open",
})


def _merge_value(value: Scalar) -> Scalar:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return value.date().isoformat()
    return value


def member_body(profile: Profile, merge_fields: Mapping[str, MappingEntry], today: date | None = None) -> dict[str, Any] | None:
    """The member Mailchimp should hold for ``profile``. Pure.

    Parameters:
      merge_fields: trait name -> merge tag, or a :class:`FieldMapping` (type, length, default).
        A trait without a value is sent as its default, else left out rather than blanked, so a
        missing value never erases one set elsewhere; a computed one is blanked.
    """
    if profile.email is None:
        return None
    values = profile_values(profile, today)
    fields: dict[str, Scalar] = {}
    for trait, spec in sorted(normalize(merge_fields).items()):
        value = values.get(trait)
        converted = convert(_merge_value(value), spec) if value is not None else None
        if converted is None:
            converted = spec.default
        if converted is not None:
            fields[spec.tag] = converted
        elif trait in COMPUTED:
            fields[spec.tag] = ""
    consent = profile.consent.get("email")
    state = consent.state if consent else "not_subscribed"
    body: dict[str, Any] = {
        "email_address": profile.email,
        "status_if_new": _STATUS_IF_NEW[state],
        "merge_fields": fields,
    }
    if state == "unsubscribed":
        body["status"] = "unsubscribed"
    return body


def member_hash(member: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(member, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Mailchimp:
    """The adapter.

    Parameters:
      base_url: API root ending in ``/3.0`` (the sandbox's, or the data centre's).
      api_key: sent as the Basic-auth password.
      list_id: the audience.
      timeout: seconds per request.
    """

    name = NAME

    def __init__(self, base_url: str, api_key: str, list_id: str, timeout: float = 10.0) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": aiohttp.encode_basic_auth("mergetag", api_key)}
        self._list = list_id
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def member(self, profile: Profile, merge_fields: Mapping[str, MappingEntry]) -> dict[str, Any] | None:
        return member_body(profile, merge_fields)

    async def upsert(self, member: dict[str, Any]) -> None:
        await self._request("PUT", f"/lists/{self._list}/members/{subscriber_hash(member['email_address'])}", member)

    async def upsert_batch(self, members: list[dict[str, Any]]) -> dict[str, str]:
        """Batch upsert (at most 500): returns the members Mailchimp refused, by lowercased email, with the reason.

        Mailchimp answers 200 even when some members fail; a failure of the whole request raises
        as for a single upsert.
        """
        if len(members) > BATCH_LIMIT:
            raise ValueError(f"at most {BATCH_LIMIT} members per batch")
        body = await self._request("POST", f"/lists/{self._list}", {"members": members, "update_existing": True})
        # Keep Mailchimp's short error and the field, never its free text (it may repeat the address).
        return {
            str(e.get("email_address", "")).lower(): f"mailchimp {e.get('error_code', 'ERROR')} {e.get('field') or ''}".strip()
            for e in (body or {}).get("errors", []) if isinstance(e, dict)
        }

    async def field_types(self) -> dict[str, str]:
        """The audience's merge fields: tag -> type."""
        body = await self._request("GET", f"/lists/{self._list}/merge-fields?count=1000")
        return {f["tag"]: f.get("type", "text") for f in (body or {}).get("merge_fields", []) if isinstance(f, dict)}

    async def get_member(self, email: str) -> dict[str, Any] | None:
        """The member as Mailchimp holds it (None when unknown)."""
        return await self._request("GET", f"/lists/{self._list}/members/{subscriber_hash(email)}", gone_ok=True)

    async def delete_permanent(self, email: str) -> None:
        """Erase a member for good (a privacy request); an unknown member is already gone."""
        await self._request("POST", f"/lists/{self._list}/members/{subscriber_hash(email)}/actions/delete-permanent", gone_ok=True)

    async def archive(self, email: str) -> None:
        """Archive a member (a profile absorbed into another): kept by Mailchimp, no longer mailed as a duplicate."""
        await self._request("DELETE", f"/lists/{self._list}/members/{subscriber_hash(email)}", gone_ok=True)

    async def _request(self, method: str, path: str, body: Any = None, gone_ok: bool = False) -> dict[str, Any] | None:
        """One API call; every failure mapped to retryable or permanent, with a PII-free detail.

        Parameters:
          gone_ok: a 404 means "already as wanted" (returns None) rather than a misconfiguration.
        """
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        try:
            async with self._session.request(method, self._base + path, json=body) as response:
                status, retry_after = response.status, response.headers.get("Retry-After")
                if gone_ok and status == 404:
                    return None
                problem = await _problem(response)
        except TimeoutError:
            # The request may still be applied late: the caller must not let another send overtake it.
            raise EspUnavailable("mailchimp timed out", code="esp_timeout") from None
        except aiohttp.ClientError as exc:
            raise EspUnavailable(f"mailchimp unreachable: {type(exc).__name__}") from None
        if status < 300:
            return problem
        detail = f"mailchimp {status} {problem.get('title', '')}".strip()
        fields = [e.get("field") for e in problem.get("errors", []) if isinstance(e, dict) and e.get("field")]
        if fields:
            detail += f" (fields: {', '.join(map(str, fields))})"
        if status == 429 or status >= 500:
            raise EspUnavailable(detail, retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None)
        if status in ACCOUNT_ERRORS:
            # A wrong key or audience is not this member's fault: retry, and alarm, until it is fixed.
            raise EspUnavailable(detail, code="esp_misconfigured")
        raise EspRejected(detail)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _problem(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """Mailchimp's problem+json, reduced to what is safe to keep (its ``detail`` may name the member)."""
    try:
        body = await response.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        return {}
    return body if isinstance(body, dict) else {}
