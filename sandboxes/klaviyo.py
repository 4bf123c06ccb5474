"""A Klaviyo sandbox: a real HTTP server that enforces the parts of Klaviyo's REST API
(revision 2026-07-15) mergetag's adapter relies on. State lives in memory.

Enforced on every ``/api/`` call, in this order:
  - ``Authorization: Klaviyo-API-Key <private key>``, else 401 (no rate-limit headers: no account).
  - Fixed-window rate limits per endpoint: a 1 s burst and a 60 s steady window, each opened by
    the first request after the previous one ran out. Beyond either: 429 ``throttled`` with
    ``Retry-After`` (integer seconds until every exhausted window reopens) and, as Klaviyo
    documents, no ``RateLimit-*`` headers. Every other response carries ``RateLimit-Limit``,
    ``RateLimit-Remaining`` and ``RateLimit-Reset`` for the steady window (Klaviyo's documented
    semantics). Defaults are the spec's ``x-klaviyo-ratelimit`` per endpoint; ``--import-limits``,
    ``--bulk-limits`` and ``--other-limits`` (``BURST,STEADY``) override them for tests.
  - ``revision: YYYY-MM-DD[.suffix]`` (a real date), else 400; POST bodies must be
    ``application/vnd.api+json``, else 415.
  - Errors are JSON:API ``{"errors": [{id, status, code, title, detail, source}]}``; details
    never repeat submitted values.

Endpoints:
  - ``POST /api/profile-import`` (body at most 100 KB): validates the profile resource (known
    attributes only, string/object types, email and E.164 phone formats, one identifier at least),
    upserts by id, else email, else external_id, else phone (409 ``duplicate_profile`` when the
    identifiers name two profiles); 201 created / 200 updated with the profile resource.
    ``null`` clears an attribute, an omitted one is kept; ``location`` and ``properties`` merge
    key by key (a ``null`` value deletes that key); ``meta.patch_properties`` is applied.
  - ``POST /api/profiles`` (body at most 100 KB): creates a profile from a ProfileCreateQuery
    (the import's attributes less ``_kx``; no ``id``, no ``meta``); 201 with the profile resource,
    or 409 ``duplicate_profile`` (pointer ``/data/attributes``, ``meta.duplicate_profile_id``)
    when its email, external_id or phone_number already names a profile, as Klaviyo answers.
  - ``GET /api/profiles/{id}`` (and ``additional-fields[profile]``): the profile, else 404.
  - ``POST /api/profile-bulk-import-jobs``: 1..10,000 profiles, body at most 5 MiB (413);
    202 with the job ``queued``; ``--job-delay-ms`` later it is ``processing`` (items applied
    as in profile-import, bad ones, and any over 100 KiB, become import errors), and after
    another delay ``complete``. ``completed_count`` counts imported items, ``failed_count``
    failed ones.
  - ``GET /api/profile-bulk-import-jobs/{job_id}``; ``GET .../{id}/import-errors``
    (``page[size]`` 1..100, default 20, ``page[cursor]`` from ``links.next``). Each error's
    ``source.pointer`` starts with ``/data/attributes/profiles/data/<index>`` and
    ``original_payload`` is that item's ``attributes``.
  - ``POST /api/profile-subscription-bulk-create-jobs`` (1..1,000) and ``...-delete-jobs``
    (1..100): email marketing consent; 202, no body. Unsubscribing creates unknown profiles.
    Subscribing never lifts an UNSUBSCRIBED consent (stricter than Klaviyo, which would):
    such a profile is skipped and counted as ``resubscribe_refused``.
  - ``POST /api/data-privacy-deletion-jobs``: exactly one of id, email, phone_number; 202.
  - ``GET /api/profiles`` with ``filter=equals(field,"v")`` or ``any(field,["v",...])`` on
    id, email, phone_number, external_id, and ``additional-fields[profile]=subscriptions``.

Sandbox-only: ``GET /_sandbox/profiles`` (every profile with its consent and lists); the stats
add per-endpoint limits, 429s given, and peak requests admitted and attempted per window.

Run: ``python -m sandboxes.klaviyo --port 8083``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from sandboxes.kit import SandboxBase, serve

DEFAULT_KEY = "pk_sandbox0000000000000000000000000000"
JSONAPI = "application/vnd.api+json"
IMPORT = "POST /api/profile-import"
BULK = "POST /api/profile-bulk-import-jobs"
# (burst per 1 s, steady per 60 s), from each operation's x-klaviyo-ratelimit in the spec.
SPEC_LIMITS: dict[str, tuple[int, int]] = {
    IMPORT: (75, 750),
    BULK: (10, 150),
    "GET /api/profile-bulk-import-jobs/{job_id}": (10, 150),
    "GET /api/profile-bulk-import-jobs/{id}/import-errors": (10, 150),
    "POST /api/profile-subscription-bulk-create-jobs": (75, 750),
    "POST /api/profile-subscription-bulk-delete-jobs": (75, 750),
    "POST /api/data-privacy-deletion-jobs": (3, 60),
    "GET /api/profiles": (75, 750),
    "POST /api/profiles": (75, 750),
    "GET /api/profiles/{id}": (75, 750),
}
BURST_S, STEADY_S = 1.0, 60.0
MAX_JOB_PROFILES = 10_000
MAX_JOB_BYTES = 5 * 1024 * 1024
MAX_PROFILE_BYTES = 100 * 1024
MAX_SUBSCRIBE, MAX_UNSUBSCRIBE = 1000, 100
MAX_PAGE = 100
JOB_TTL = timedelta(days=7)

STRING_ATTRIBUTES = ("email", "phone_number", "external_id", "_kx", "first_name", "last_name",
                     "organization", "locale", "title", "image")
SHOWN_ATTRIBUTES = tuple(a for a in STRING_ATTRIBUTES if a != "_kx")
# ProfileCreateQuery takes the import's string attributes less _kx.
CREATE_STRING_ATTRIBUTES = SHOWN_ATTRIBUTES
IDENTIFIERS = ("email", "external_id", "phone_number")
LOCATION_KEYS = ("address1", "address2", "city", "country", "latitude", "longitude", "region", "zip", "timezone", "ip")
FILTER_FIELDS = ("id", "email", "phone_number", "external_id")
EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,63}$")
PHONE = re.compile(r"^\+[1-9][0-9]{6,14}$")
REVISION = re.compile(r"^([0-9]{4}-[0-9]{2}-[0-9]{2})(\.[A-Za-z0-9_-]+)?$")
FILTER = re.compile(r"^\s*(equals|any)\(\s*([A-Za-z_]+)\s*,\s*(.*?)\s*\)\s*$")
QUOTED = re.compile(r"\"((?:[^\"\\]|\\.)*)\"|'((?:[^'\\]|\\.)*)'")
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODES = {400: "invalid", 401: "not_authenticated", 403: "permission_denied", 404: "not_found", 405: "method_not_allowed",
         409: "duplicate_profile", 413: "request_too_large", 415: "unsupported_media_type", 429: "throttled",
         500: "error", 502: "error", 503: "service_unavailable", 504: "error"}


class Problem(Exception):
    """A request or item the real API would refuse; becomes an error object or an import error."""

    def __init__(self, detail: str, pointer: str | None = "/data", *, status: int = 400, code: str | None = None,
                 title: str = "Invalid input.", parameter: str | None = None, meta: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail, self.pointer, self.status, self.title = detail, pointer, status, title
        self.code = code or CODES.get(status, "error")
        self.parameter, self.meta = parameter, meta


def now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="microseconds") if moment else None


def ulid() -> str:
    """Klaviyo ids are 26-character ULIDs."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def norm(key: str, value: str) -> str:
    return value.lower() if key == "email" else value


def obj(value: Any, at: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Problem("This field is required." if value is None else "Expected an object.", at)
    return value


def maybe_obj(value: Any, at: str) -> dict[str, Any] | None:
    return None if value is None else obj(value, at)


def only(value: dict[str, Any], allowed: tuple[str, ...], at: str, resource: str) -> None:
    for key in value:
        if key not in allowed:
            raise Problem(f"'{key}' is not a valid field for the resource '{resource}'.", f"{at}/{key}")


def string(value: Any, at: str, *, nullable: bool = True) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise Problem("Expected a string.", at)
    return value


def typed(data: Any, expected: str, at: str = "/data") -> dict[str, Any]:
    data = obj(data, at)
    if data.get("type") != expected:
        raise Problem(f"Expected a resource of type '{expected}'.", f"{at}/type")
    return data


def check_email(email: str | None, at: str) -> None:
    if email is not None and not EMAIL.match(email):
        raise Problem("Invalid email address", at)


def check_phone(phone: str | None, at: str) -> None:
    if phone is not None and not PHONE.match(phone):
        raise Problem("Invalid phone number format (expected E.164, e.g. +15005550006)", at)


def check_profile(item: Any, at: str) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """A ProfileUpsertQueryResourceObject: (id, attributes, patch_properties), or a Problem."""
    item = typed(item, "profile", at)
    only(item, ("type", "id", "attributes", "meta"), at, "profile")
    profile_id = string(item.get("id"), f"{at}/id")
    attributes = check_attributes(item.get("attributes"), f"{at}/attributes", STRING_ATTRIBUTES, profile_id is not None)
    return profile_id, attributes, check_meta(item.get("meta"), f"{at}/meta")


def check_new_profile(item: Any, at: str) -> dict[str, Any]:
    """A ProfileCreateQueryResourceObject (no id, no meta, no ``_kx``): its attributes, or a Problem."""
    item = typed(item, "profile", at)
    only(item, ("type", "attributes"), at, "profile")
    return check_attributes(item.get("attributes"), f"{at}/attributes", CREATE_STRING_ATTRIBUTES, False)


def check_attributes(value: Any, at: str, strings: tuple[str, ...], has_id: bool) -> dict[str, Any]:
    """A profile's attributes: known keys only, typed, email and phone well formed, an identifier unless ``has_id``."""
    attributes = obj(value, at)
    for key, value in attributes.items():
        where = f"{at}/{key}"
        if key in strings:
            string(value, where)
        elif key == "location":
            location = maybe_obj(value, where)
            for part, part_value in (location or {}).items():
                if part not in LOCATION_KEYS:
                    raise Problem(f"'{part}' is not a valid field for a profile location.", f"{where}/{part}")
                numeric = part in ("latitude", "longitude") and isinstance(part_value, int | float) and not isinstance(part_value, bool)
                if not numeric:
                    string(part_value, f"{where}/{part}")
        elif key == "properties":
            maybe_obj(value, where)
        else:
            raise Problem(f"'{key}' is not a valid field for the resource 'profile'.", where)
    check_email(attributes.get("email"), f"{at}/email")
    check_phone(attributes.get("phone_number"), f"{at}/phone_number")
    if not has_id and not any(attributes.get(key) for key in IDENTIFIERS):
        raise Problem("One of email, phone_number or external_id is required.", at)
    return attributes


def check_meta(meta: Any, at: str) -> dict[str, Any]:
    meta = maybe_obj(meta, at) or {}
    only(meta, ("patch_properties", "patch_identifiers"), at, "profile meta")
    if meta.get("patch_identifiers") is not None:
        raise Problem("patch_identifiers is not supported by the sandbox.", f"{at}/patch_identifiers")
    patch = maybe_obj(meta.get("patch_properties"), f"{at}/patch_properties") or {}
    only(patch, ("append", "unappend", "unset"), f"{at}/patch_properties", "patch_properties")
    for key in ("append", "unappend"):
        maybe_obj(patch.get(key), f"{at}/patch_properties/{key}")
    unset = patch.get("unset")
    if unset is not None and not isinstance(unset, str) and not (isinstance(unset, list) and all(isinstance(u, str) for u in unset)):
        raise Problem("Expected a string or a list of strings.", f"{at}/patch_properties/unset")
    return patch


def patch_properties(properties: dict[str, Any], patch: dict[str, Any]) -> None:
    unset = patch.get("unset")
    for key in [unset] if isinstance(unset, str) else unset or []:
        properties.pop(key, None)
    for key, value in (patch.get("append") or {}).items():
        values = value if isinstance(value, list) else [value]
        existing = properties.get(key)
        properties[key] = [*(existing if isinstance(existing, list) else [] if existing is None else [existing]), *values]
    for key, value in (patch.get("unappend") or {}).items():
        values = value if isinstance(value, list) else [value]
        if isinstance(properties.get(key), list):
            properties[key] = [v for v in properties[key] if v not in values]


@dataclass
class Window:
    """One fixed window: opened by the first request after the previous one ran out."""

    size: float
    limit: int
    start: float = -math.inf
    admitted: int = 0
    attempted: int = 0
    peak_admitted: int = 0
    peak_attempted: int = 0

    def roll(self, moment: float) -> None:
        if moment - self.start >= self.size:
            self.start, self.admitted, self.attempted = moment, 0, 0

    def reset_in(self, moment: float) -> int:
        # Never more than the window: ``start + size - start`` can come out a hair above ``size`` in floats.
        return min(math.ceil(self.size), max(1, math.ceil(self.start + self.size - moment)))


@dataclass
class Bucket:
    burst: Window
    steady: Window
    throttled: int = 0

    def take(self, moment: float) -> int | None:
        """None when admitted, else the seconds until every exhausted window reopens."""
        windows = (self.burst, self.steady)
        for window in windows:
            window.roll(moment)
            window.attempted += 1
            window.peak_attempted = max(window.peak_attempted, window.attempted)
        full = [w for w in windows if w.admitted >= w.limit]
        if full:
            self.throttled += 1
            return max(w.reset_in(moment) for w in full)
        for window in windows:
            window.admitted += 1
            window.peak_admitted = max(window.peak_admitted, window.admitted)
        return None

    def stats(self) -> dict[str, int]:
        return {"burst_limit": self.burst.limit, "steady_limit": self.steady.limit,
                "peak_admitted_1s": self.burst.peak_admitted, "peak_admitted_60s": self.steady.peak_admitted,
                "peak_attempted_1s": self.burst.peak_attempted, "peak_attempted_60s": self.steady.peak_attempted,
                "throttled": self.throttled}

    def reset_stats(self) -> None:
        self.throttled = 0
        for window in (self.burst, self.steady):
            window.peak_admitted, window.peak_attempted = window.admitted, window.attempted


@dataclass
class Job:
    id: str
    items: list[Any]
    sizes: list[int]
    lists: list[str]
    created_at: datetime
    status: str = "queued"
    completed: int = 0
    failed: int = 0
    started_at: datetime | None = None
    completed_at: datetime | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0


@dataclass
class ConsentItem:
    profile_id: str | None
    email: str | None
    phone: str | None
    email_marketing: bool
    consented_at: datetime | None = None


def _consent_item(item: Any, at: str, consent: str, historical: bool) -> ConsentItem:
    """One profile of a subscription job (ProfileSubscriptionCreate/DeleteQueryResourceObject)."""
    subscribing = consent == "SUBSCRIBED"
    item = typed(item, "profile", at)
    only(item, ("type", "id", "attributes") if subscribing else ("type", "attributes"), at, "profile")
    profile_id = string(item.get("id"), f"{at}/id")
    fields = obj(item.get("attributes"), f"{at}/attributes")
    only(fields, ("email", "phone_number", "subscriptions", *(("age_gated_date_of_birth",) if subscribing else ())),
         f"{at}/attributes", "profile")
    email = string(fields.get("email"), f"{at}/attributes/email")
    phone = string(fields.get("phone_number"), f"{at}/attributes/phone_number")
    check_email(email, f"{at}/attributes/email")
    check_phone(phone, f"{at}/attributes/phone_number")
    channels = obj(fields.get("subscriptions"), f"{at}/attributes/subscriptions")
    only(channels, ("email", "sms", "whatsapp", "push"), f"{at}/attributes/subscriptions", "subscriptions")
    for channel, value in channels.items():
        obj(value, f"{at}/attributes/subscriptions/{channel}")
    if not (email or phone or profile_id):
        raise Problem("One of email or phone_number is required.", f"{at}/attributes")
    where = f"{at}/attributes/subscriptions/email"
    email_channel = channels.get("email") or {}
    only(email_channel, ("marketing", "open_tracking"), where, "email subscription")
    marketing = maybe_obj(email_channel.get("marketing"), f"{where}/marketing")
    if marketing is None:
        return ConsentItem(profile_id, email, phone, False)
    only(marketing, ("consent", "consented_at") if subscribing else ("consent",), f"{where}/marketing", "marketing")
    if marketing.get("consent") != consent:
        raise Problem(f"consent must be \"{consent}\".", f"{where}/marketing/consent")
    if not (email or profile_id):
        raise Problem("An email address is required for an email subscription.", f"{at}/attributes/email")
    consented_at = _consented_at(marketing.get("consented_at"), historical, f"{where}/marketing/consented_at")
    if historical and consented_at is None:
        raise Problem("consented_at is required for a historical import.", f"{where}/marketing/consented_at")
    return ConsentItem(profile_id, email, phone, True, consented_at)


class Sandbox(SandboxBase):
    """The in-memory account: profiles, consent, bulk jobs, and the contract checks.

    Parameters:
      api_key: the only private key accepted.
      limits: endpoint ("METHOD /path") -> (burst per 1 s, steady per 60 s).
      job_delay_s: how long a bulk job stays queued, then processing.
    """

    def __init__(self, api_key: str, limits: dict[str, tuple[int, int]], job_delay_s: float) -> None:
        super().__init__()
        self.api_key = api_key
        self.buckets = {name: Bucket(Window(BURST_S, burst), Window(STEADY_S, steady)) for name, (burst, steady) in limits.items()}
        self.job_delay_s = job_delay_s
        self.profiles: dict[str, dict[str, Any]] = {}
        self.index: dict[str, dict[str, str]] = {key: {} for key in IDENTIFIERS}
        self.jobs: dict[str, Job] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.resubscribe_refused = 0
        self.deleted = 0

    def app(self) -> web.Application:
        app = super().app()
        app.on_response_prepare.append(self._rate_headers)
        return app

    def routes(self, app: web.Application) -> None:
        for method, path, handler in (
            ("POST", "/api/profile-import", self.profile_import),
            ("POST", "/api/profile-bulk-import-jobs", self.create_job),
            ("GET", "/api/profile-bulk-import-jobs/{job_id}", self.get_job),
            ("GET", "/api/profile-bulk-import-jobs/{id}/import-errors", self.import_errors),
            ("POST", "/api/profile-subscription-bulk-create-jobs", self.subscribe),
            ("POST", "/api/profile-subscription-bulk-delete-jobs", self.unsubscribe),
            ("POST", "/api/data-privacy-deletion-jobs", self.delete_profile),
            ("GET", "/api/profiles", self.get_profiles),
            ("POST", "/api/profiles", self.create_profile),
            ("GET", "/api/profiles/{id}", self.get_profile),
        ):
            app.router.add_route(method, path, self._guarded(handler))
        app.router.add_get("/_sandbox/profiles", self.all_profiles)

    def error(self, status: int, title: str, detail: str, *, code: str | None = None, pointer: str | None = None,
              parameter: str | None = None, meta: dict[str, Any] | None = None, retry_after: int | None = None) -> web.Response:
        entry: dict[str, Any] = {"id": str(uuid.uuid4()), "status": status, "code": code or CODES.get(status, "error"),
                                 "title": title, "detail": detail}
        if pointer is not None or parameter is not None:
            entry["source"] = {"pointer": pointer} if pointer is not None else {"parameter": parameter}
        if meta:
            entry["meta"] = meta
        headers = {"Retry-After": str(retry_after or 1)} if status == 429 else None
        return web.json_response({"errors": [entry]}, status=status, content_type=JSONAPI, headers=headers)

    def _problem(self, problem: Problem) -> web.Response:
        return self.error(problem.status, problem.title, problem.detail, code=problem.code, pointer=problem.pointer,
                          parameter=problem.parameter, meta=problem.meta)

    def _guarded(self, handler: Any) -> Any:
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except Problem as problem:
                return self._problem(problem)
        return run

    async def admit(self, request: web.Request) -> web.StreamResponse | None:
        header = request.headers.get("Authorization", "")
        if not header:
            return self.error(401, "Authentication credentials were not provided.", "Missing or invalid private key.")
        scheme, _, key = header.partition(" ")
        if scheme != "Klaviyo-API-Key" or key.strip() != self.api_key:
            return self.error(401, "Incorrect authentication credentials.", "Missing or invalid private key.",
                              code="authentication_failed")
        match = request.match_info
        if match.http_exception is not None:
            status = match.http_exception.status
            title = "Not found." if status == 404 else f'Method "{request.method}" not allowed.'
            return self.error(status, title, title)
        resource = match.route.resource
        bucket = self.buckets.get(f"{request.method} {resource.canonical}") if resource else None
        if bucket is not None:
            moment = time.monotonic()
            wait = bucket.take(moment)
            if wait is not None:
                return self.error(429, "Request was throttled.", f"Request was throttled. Expected available in {wait} second{'s' if wait > 1 else ''}.",
                                  retry_after=wait)
            steady = bucket.steady
            request["ratelimit"] = {"RateLimit-Limit": str(steady.limit), "RateLimit-Remaining": str(steady.limit - steady.admitted),
                                    "RateLimit-Reset": str(steady.reset_in(moment))}
        if not _valid_revision(request.headers.get("revision", "")):
            return self.error(400, "Invalid input.", "A valid `revision` header (YYYY-MM-DD) is required.", parameter="revision")
        if request.method == "POST" and request.content_type != JSONAPI:
            return self.error(415, "Unsupported media type.", f'Unsupported media type "{request.content_type}" in request. Use "{JSONAPI}".')
        return None

    async def _rate_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        if "ratelimit" in request and response.status != 429:
            response.headers.update(request["ratelimit"])

    async def _reset_stats(self, request: web.Request) -> web.Response:
        for bucket in self.buckets.values():
            bucket.reset_stats()
        self.resubscribe_refused = 0
        return await super()._reset_stats(request)

    def extra_stats(self) -> dict[str, Any]:
        return {"rate_limits": {name: bucket.stats() for name, bucket in self.buckets.items()},
                "throttled": sum(b.throttled for b in self.buckets.values()),
                "resubscribe_refused": self.resubscribe_refused, "profiles": len(self.profiles),
                "jobs": len(self.jobs), "deleted": self.deleted}

    async def _data(self, request: web.Request, limit: int) -> dict[str, Any]:
        """The document's ``data`` object, after the size and JSON checks."""
        raw = await request.read()
        if len(raw) > limit:
            raise Problem(f"The request body exceeds the {limit}-byte limit.", None, status=413, title="Request entity too large.")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise Problem("JSON parse error.", None, code="parse_error", title="Malformed request.") from None
        if not isinstance(body, dict):
            raise Problem("Expected a JSON:API document.", "")
        return obj(body.get("data"), "/data")

    @staticmethod
    def _base(request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    def _resolve(self, profile_id: str | None, attributes: dict[str, Any], at: str) -> dict[str, Any] | None:
        """The profile to update (id, else email, else external_id, else phone), or None to create."""
        found: list[tuple[str, dict[str, Any]]] = []
        if profile_id is not None:
            profile = self.profiles.get(profile_id)
            if profile is None:
                raise Problem("No profile with this id.", f"{at}/id", status=404, code="not_found", title="Not found.")
            found.append(("id", profile))
        for key in IDENTIFIERS:
            value = attributes.get(key)
            owner = self.index[key].get(norm(key, value)) if value else None
            if owner:
                found.append((key, self.profiles[owner]))
        if not found:
            return None
        target = found[0][1]
        for key, profile in found:
            if profile["id"] != target["id"]:
                raise Problem("A profile already exists with one of these identifiers.", f"{at}/attributes/{key}",
                              status=409, title="Conflict.", meta={"duplicate_profile_id": profile["id"]})
        return target

    def _new_profile(self) -> dict[str, Any]:
        moment = now()
        profile = {"id": ulid(), **dict.fromkeys(STRING_ATTRIBUTES), "location": {}, "properties": {},
                   "created": moment, "updated": moment, "consent": "NEVER_SUBSCRIBED", "consent_timestamp": None,
                   "consent_method": None, "custom_method_detail": None, "suppression": [], "list_suppressions": [],
                   "lists": [], "consent_updated": None}
        self.profiles[profile["id"]] = profile
        return profile

    def _set_identifier(self, profile: dict[str, Any], key: str, value: str | None) -> None:
        old = profile.get(key)
        if old:
            self.index[key].pop(norm(key, old), None)
        profile[key] = value
        if value:
            self.index[key][norm(key, value)] = profile["id"]

    def _upsert(self, profile_id: str | None, attributes: dict[str, Any], patch: dict[str, Any], at: str) -> tuple[dict[str, Any], bool]:
        target = self._resolve(profile_id, attributes, at)
        profile = self._new_profile() if target is None else target
        self._apply(profile, attributes, patch)
        return profile, target is None

    def _create(self, attributes: dict[str, Any]) -> dict[str, Any]:
        """A new profile, unless one of its identifiers already names a profile (409, as Klaviyo answers)."""
        for key in IDENTIFIERS:
            value = attributes.get(key)
            owner = self.index[key].get(norm(key, value)) if value else None
            if owner:
                raise Problem("A profile already exists with one of these identifiers.", "/data/attributes",
                              status=409, title="Conflict.", meta={"duplicate_profile_id": owner})
        profile = self._new_profile()
        self._apply(profile, attributes, {})
        return profile

    def _apply(self, profile: dict[str, Any], attributes: dict[str, Any], patch: dict[str, Any]) -> None:
        """Write the given attributes: ``null`` clears, an omitted one is kept, location and properties merge."""
        for key in STRING_ATTRIBUTES:
            if key in attributes:
                if key in IDENTIFIERS:
                    self._set_identifier(profile, key, attributes[key])
                else:
                    profile[key] = attributes[key]
        if "location" in attributes:
            _merge(profile["location"], attributes["location"])
        if "properties" in attributes:
            _merge(profile["properties"], attributes["properties"])
        patch_properties(profile["properties"], patch)
        profile["updated"] = now()
        self.record_write(profile["email"] or "", self._fields(profile))

    @staticmethod
    def _fields(profile: dict[str, Any]) -> dict[str, Any]:
        """What history records: properties as-is, then the set standard attributes by name."""
        standard = {key: profile[key] for key in SHOWN_ATTRIBUTES if profile[key] is not None}
        if profile["location"]:
            standard["location"] = dict(profile["location"])
        return {**profile["properties"], **standard}

    def _resource(self, profile: dict[str, Any], base: str, extra: set[str]) -> dict[str, Any]:
        attributes: dict[str, Any] = {key: profile[key] for key in SHOWN_ATTRIBUTES}
        attributes.update(created=iso(profile["created"]), updated=iso(profile["updated"]), last_event_date=None,
                          location={key: profile["location"].get(key) for key in LOCATION_KEYS},
                          properties=dict(profile["properties"]))
        if "subscriptions" in extra:
            attributes["subscriptions"] = {"email": {"marketing": self._marketing(profile)}}
        if "predictive_analytics" in extra:
            attributes["predictive_analytics"] = {}
        return {"type": "profile", "id": profile["id"], "attributes": attributes,
                "links": {"self": f"{base}/api/profiles/{profile['id']}"}}

    @staticmethod
    def _marketing(profile: dict[str, Any]) -> dict[str, Any]:
        return {"can_receive_email_marketing": profile["consent"] != "UNSUBSCRIBED" and not profile["suppression"],
                "consent": profile["consent"], "consent_timestamp": iso(profile["consent_timestamp"]),
                "last_updated": iso(profile["consent_updated"]), "method": profile["consent_method"], "method_detail": "",
                "custom_method_detail": profile["custom_method_detail"], "double_optin": None,
                "suppression": [{"reason": s["reason"], "timestamp": iso(s["timestamp"])} for s in profile["suppression"]],
                "list_suppressions": [{"list_id": s["list_id"], "reason": s["reason"], "timestamp": iso(s["timestamp"])}
                                      for s in profile["list_suppressions"]]}

    @staticmethod
    def _additional_fields(request: web.Request) -> set[str]:
        raw = request.query.get("additional-fields[profile]", "")
        extra = {part.strip() for part in raw.split(",") if part.strip()}
        unknown = extra - {"subscriptions", "predictive_analytics"}
        if unknown:
            raise Problem(f"'{sorted(unknown)[0]}' is not a valid additional field for 'profile'.", None,
                          parameter="additional-fields[profile]")
        return extra

    @staticmethod
    def _page(request: web.Request) -> tuple[int, int]:
        """(page size, offset) from ``page[size]`` and the opaque ``page[cursor]``."""
        try:
            size = int(request.query.get("page[size]", "20"))
        except ValueError:
            size = 0
        if not 1 <= size <= MAX_PAGE:
            raise Problem(f"page[size] must be an integer between 1 and {MAX_PAGE}.", None, parameter="page[size]")
        cursor = request.query.get("page[cursor]")
        if cursor is None:
            return size, 0
        try:
            kind, _, offset = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().partition(":")
            if kind != "o" or not offset.isdigit():
                raise ValueError(cursor)
        except (ValueError, UnicodeDecodeError):
            raise Problem("Invalid page[cursor].", None, parameter="page[cursor]") from None
        return size, int(offset)

    @staticmethod
    def _collection(request: web.Request, items: list[dict[str, Any]], size: int, offset: int) -> dict[str, Any]:
        links = {"self": str(request.url)}
        if offset + size < len(items):
            links["next"] = str(request.url.update_query({"page[cursor]": _cursor(offset + size)}))
        if offset > 0:
            links["prev"] = str(request.url.update_query({"page[cursor]": _cursor(max(0, offset - size))}))
        return {"data": items[offset:offset + size], "links": links}

    async def profile_import(self, request: web.Request) -> web.Response:
        data = await self._data(request, MAX_PROFILE_BYTES)
        extra = self._additional_fields(request)
        profile_id, attributes, patch = check_profile(data, "/data")
        profile, created = self._upsert(profile_id, attributes, patch, "/data")
        resource = self._resource(profile, self._base(request), extra)
        return web.json_response({"data": resource, "links": {"self": resource["links"]["self"]}},
                                 status=201 if created else 200, content_type=JSONAPI)

    async def create_profile(self, request: web.Request) -> web.Response:
        data = await self._data(request, MAX_PROFILE_BYTES)
        extra = self._additional_fields(request)
        profile = self._create(check_new_profile(data, "/data"))
        resource = self._resource(profile, self._base(request), extra)
        return web.json_response({"data": resource, "links": {"self": resource["links"]["self"]}}, status=201, content_type=JSONAPI)

    async def get_profile(self, request: web.Request) -> web.Response:
        extra = self._additional_fields(request)
        profile = self.profiles.get(request.match_info["id"])
        if profile is None:
            raise Problem("No profile with this id.", None, status=404, title="Not found.")
        resource = self._resource(profile, self._base(request), extra)
        return web.json_response({"data": resource, "links": {"self": resource["links"]["self"]}}, content_type=JSONAPI)

    async def create_job(self, request: web.Request) -> web.Response:
        data = typed(await self._data(request, MAX_JOB_BYTES), "profile-bulk-import-job")
        only(data, ("type", "attributes", "relationships"), "/data", "profile-bulk-import-job")
        attributes = obj(data.get("attributes"), "/data/attributes")
        only(attributes, ("profiles",), "/data/attributes", "profile-bulk-import-job")
        items = _profiles(attributes, "/data/attributes/profiles", MAX_JOB_PROFILES)
        lists: list[str] = []
        relationships = maybe_obj(data.get("relationships"), "/data/relationships") or {}
        only(relationships, ("lists",), "/data/relationships", "profile-bulk-import-job")
        if "lists" in relationships:
            linked = obj(relationships["lists"], "/data/relationships/lists")
            entries = linked.get("data")
            if not isinstance(entries, list):
                raise Problem("Expected a list of list resource identifiers.", "/data/relationships/lists/data")
            for i, entry in enumerate(entries):
                entry = typed(entry, "list", f"/data/relationships/lists/data/{i}")
                lists.append(string(entry.get("id"), f"/data/relationships/lists/data/{i}/id", nullable=False) or "")
        sizes = [len(json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()) for item in items]
        job = Job(ulid(), list(items), sizes, lists, now(), total=len(items))
        self.jobs[job.id] = job
        task = asyncio.create_task(self._run(job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return web.json_response({"data": self._job_resource(job, self._base(request))}, status=202, content_type=JSONAPI)

    async def _run(self, job: Job) -> None:
        """Queued for one delay, then processing (items applied in chunks) for another, then complete."""
        await asyncio.sleep(self.job_delay_s)
        job.status, job.started_at = "processing", now()
        chunk = 500
        steps = max(1, math.ceil(job.total / chunk))
        for start in range(0, job.total, chunk):
            for index in range(start, min(job.total, start + chunk)):
                self._import_item(job, index)
            await asyncio.sleep(self.job_delay_s / steps)
        job.items = []
        job.status, job.completed_at = "complete", now()

    def _import_item(self, job: Job, index: int) -> None:
        at = f"/data/attributes/profiles/data/{index}"
        item = job.items[index]
        try:
            if job.sizes[index] > MAX_PROFILE_BYTES:
                raise Problem(f"The profile exceeds the {MAX_PROFILE_BYTES}-byte limit.", at)
            profile_id, attributes, patch = check_profile(item, at)
            profile, _ = self._upsert(profile_id, attributes, patch, at)
        except Problem as problem:
            job.failed += 1
            payload = item.get("attributes") if isinstance(item, dict) else None
            job.errors.append({"type": "import-error", "id": str(uuid.uuid4()), "attributes": {
                "code": problem.code, "title": problem.title, "detail": problem.detail,
                "source": {"pointer": problem.pointer or at},
                "original_payload": payload if isinstance(payload, dict) else None}})
            return
        for list_id in job.lists:
            if list_id not in profile["lists"]:
                profile["lists"].append(list_id)
        job.completed += 1

    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise Problem("Not found.", None, status=404, title="Not found.")
        return job

    def _job_resource(self, job: Job, base: str) -> dict[str, Any]:
        url = f"{base}/api/profile-bulk-import-jobs/{job.id}"
        return {"type": "profile-bulk-import-job", "id": job.id, "attributes": {
            "status": job.status, "created_at": iso(job.created_at), "total_count": job.total,
            "completed_count": job.completed, "failed_count": job.failed, "completed_at": iso(job.completed_at),
            "expires_at": iso(job.created_at + JOB_TTL), "started_at": iso(job.started_at)},
            "relationships": {"lists": {"data": [{"type": "list", "id": list_id} for list_id in job.lists]},
                              "import-errors": {"links": {"related": f"{url}/import-errors"}}},
            "links": {"self": url}}

    async def get_job(self, request: web.Request) -> web.Response:
        job = self._job(request.match_info["job_id"])
        return web.json_response({"data": self._job_resource(job, self._base(request))}, content_type=JSONAPI)

    async def import_errors(self, request: web.Request) -> web.Response:
        job = self._job(request.match_info["id"])
        size, offset = self._page(request)
        return web.json_response(self._collection(request, job.errors, size, offset), content_type=JSONAPI)

    def _consent_items(self, data: dict[str, Any], kind: str, consent: str, limit: int) -> tuple[list[ConsentItem], str | None, str | None]:
        """Validate a whole subscription job before applying any of it: (items, list id, custom source)."""
        data = typed(data, kind)
        only(data, ("type", "attributes", "relationships"), "/data", kind)
        attributes = obj(data.get("attributes"), "/data/attributes")
        subscribing = consent == "SUBSCRIBED"
        only(attributes, ("profiles", "custom_source", "historical_import") if subscribing else ("profiles",), "/data/attributes", kind)
        source = string(attributes.get("custom_source"), "/data/attributes/custom_source")
        historical = attributes.get("historical_import")
        if historical is not None and not isinstance(historical, bool):
            raise Problem("Expected a boolean.", "/data/attributes/historical_import")
        items = _profiles(attributes, "/data/attributes/profiles", limit)
        list_id = _list_relationship(data)
        return [_consent_item(item, f"/data/attributes/profiles/data/{i}", consent, bool(historical))
                for i, item in enumerate(items)], list_id, source

    def _consent_target(self, item: ConsentItem) -> dict[str, Any]:
        """The profile a consent change applies to (by id, email, then phone), created when unknown, as Klaviyo does."""
        if item.profile_id in self.profiles:
            return self.profiles[item.profile_id or ""]
        for key, value in (("email", item.email), ("phone_number", item.phone)):
            owner = self.index[key].get(norm(key, value)) if value else None
            if owner:
                return self.profiles[owner]
        profile = self._new_profile()
        for key, value in (("email", item.email), ("phone_number", item.phone)):
            if value:
                self._set_identifier(profile, key, value)
        return profile

    async def subscribe(self, request: web.Request) -> web.Response:
        data = await self._data(request, MAX_JOB_BYTES)
        items, list_id, source = self._consent_items(data, "profile-subscription-bulk-create-job", "SUBSCRIBED", MAX_SUBSCRIBE)
        for item in items:
            profile = self._consent_target(item)
            if not item.email_marketing:
                continue
            if profile["consent"] == "UNSUBSCRIBED" or any(s["list_id"] == list_id for s in profile["list_suppressions"]):
                self.resubscribe_refused += 1
                continue
            moment = now()
            profile.update(consent="SUBSCRIBED", consent_timestamp=item.consented_at or moment, consent_updated=moment,
                           consent_method="API", custom_method_detail=source)
            if list_id and list_id not in profile["lists"]:
                profile["lists"].append(list_id)
        return web.Response(status=202)

    async def unsubscribe(self, request: web.Request) -> web.Response:
        data = await self._data(request, MAX_JOB_BYTES)
        items, list_id, _ = self._consent_items(data, "profile-subscription-bulk-delete-job", "UNSUBSCRIBED", MAX_UNSUBSCRIBE)
        for item in items:
            profile = self._consent_target(item)
            if not item.email_marketing:
                continue
            moment = now()
            if list_id and list_id in profile["lists"]:
                # As Klaviyo: a profile in the given list leaves that list; any other is unsubscribed globally.
                profile["lists"].remove(list_id)
                profile["list_suppressions"].append({"list_id": list_id, "reason": "USER_SUPPRESSED", "timestamp": moment})
                continue
            profile.update(consent="UNSUBSCRIBED", consent_timestamp=moment, consent_updated=moment, consent_method="API")
            profile["suppression"] = [{"reason": "UNSUBSCRIBE", "timestamp": moment}]
        return web.Response(status=202)

    async def delete_profile(self, request: web.Request) -> web.Response:
        data = typed(await self._data(request, MAX_PROFILE_BYTES), "data-privacy-deletion-job")
        only(data, ("type", "attributes"), "/data", "data-privacy-deletion-job")
        attributes = obj(data.get("attributes"), "/data/attributes")
        only(attributes, ("profile",), "/data/attributes", "data-privacy-deletion-job")
        wrapper = obj(attributes.get("profile"), "/data/attributes/profile")
        at = "/data/attributes/profile/data"
        item = typed(wrapper.get("data"), "profile", at)
        only(item, ("type", "id", "attributes"), at, "profile")
        fields = maybe_obj(item.get("attributes"), f"{at}/attributes") or {}
        only(fields, ("email", "phone_number"), f"{at}/attributes", "profile")
        given = {"id": string(item.get("id"), f"{at}/id"), "email": string(fields.get("email"), f"{at}/attributes/email"),
                 "phone_number": string(fields.get("phone_number"), f"{at}/attributes/phone_number")}
        given = {key: value for key, value in given.items() if value is not None}
        if len(given) != 1:
            raise Problem("Exactly one of id, email or phone_number is required.", at)
        key, value = next(iter(given.items()))
        check_email(given.get("email"), f"{at}/attributes/email")
        check_phone(given.get("phone_number"), f"{at}/attributes/phone_number")
        # As Klaviyo: a deletion job, run later; the profile stays readable until it has run.
        asyncio.get_running_loop().call_later(self.job_delay_s, self._forget, key, value)
        return web.Response(status=202)

    def _forget(self, key: str, value: str) -> None:
        owner = value if key == "id" else self.index[key].get(norm(key, value))
        profile = self.profiles.pop(owner or "", None)
        if profile is not None:
            for identifier in IDENTIFIERS:
                if profile[identifier]:
                    self.index[identifier].pop(norm(identifier, profile[identifier]), None)
            self.deleted += 1

    def _filter(self, expression: str | None) -> list[dict[str, Any]]:
        if expression is None:
            return list(self.profiles.values())
        matched = FILTER.match(expression)
        if matched is None or matched.group(2) not in FILTER_FIELDS:
            raise Problem("Invalid filter: supported are equals(field,\"value\") and any(field,[...]) on "
                          + ", ".join(FILTER_FIELDS) + ".", None, parameter="filter")
        operator, key, raw = matched.groups()
        if operator == "equals":
            quoted = [QUOTED.fullmatch(raw)]
        elif raw.startswith("[") and raw.endswith("]") and raw[1:-1].strip():
            quoted = [QUOTED.fullmatch(part.strip()) for part in raw[1:-1].split(",")]
        else:
            quoted = [None]
        if None in quoted:
            raise Problem("Invalid filter value: expected a quoted string, or for any() a list of them.", None, parameter="filter")
        values = [m.group(1) if m.group(1) is not None else m.group(2) for m in quoted if m]
        if key == "id":
            return [self.profiles[v] for v in dict.fromkeys(values) if v in self.profiles]
        owners = dict.fromkeys(self.index[key].get(norm(key, v)) for v in values)
        return [self.profiles[owner] for owner in owners if owner]

    async def get_profiles(self, request: web.Request) -> web.Response:
        extra = self._additional_fields(request)
        size, offset = self._page(request)
        base = self._base(request)
        resources = [self._resource(profile, base, extra) for profile in self._filter(request.query.get("filter"))]
        return web.json_response(self._collection(request, resources, size, offset), content_type=JSONAPI)

    async def all_profiles(self, request: web.Request) -> web.Response:
        base = self._base(request)
        rows = []
        for profile in self.profiles.values():
            resource = self._resource(profile, base, {"subscriptions"})
            rows.append({"id": profile["id"], **resource["attributes"], "lists": list(profile["lists"])})
        return web.json_response(rows)


def _merge(stored: dict[str, Any], update: dict[str, Any] | None) -> None:
    """Key by key: a null value deletes the key; a null object clears them all."""
    if update is None:
        stored.clear()
        return
    for key, value in update.items():
        if value is None:
            stored.pop(key, None)
        else:
            stored[key] = value


def _valid_revision(revision: str) -> bool:
    matched = REVISION.match(revision)
    if matched is None:
        return False
    try:
        date.fromisoformat(matched.group(1))
    except ValueError:
        return False
    return True


def _cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode().rstrip("=")


def _profiles(attributes: dict[str, Any], at: str, limit: int) -> list[Any]:
    """``attributes.profiles.data``: a list of 1..limit items (each checked later)."""
    profiles = obj(attributes.get("profiles"), at)
    items = profiles.get("data")
    if not isinstance(items, list) or not items:
        raise Problem("Expected a non-empty list of profiles.", f"{at}/data")
    if len(items) > limit:
        raise Problem(f"At most {limit:,} profiles are allowed per request.", f"{at}/data")
    return items


def _list_relationship(data: dict[str, Any]) -> str | None:
    relationships = maybe_obj(data.get("relationships"), "/data/relationships") or {}
    only(relationships, ("list",), "/data/relationships", "relationships")
    if "list" not in relationships:
        return None
    linked = obj(relationships["list"], "/data/relationships/list")
    entry = typed(linked.get("data"), "list", "/data/relationships/list/data")
    return string(entry.get("id"), "/data/relationships/list/data/id", nullable=False)


def _consented_at(value: Any, historical: bool, at: str) -> datetime | None:
    if value is None:
        return None
    if not historical:
        raise Problem("consented_at is only allowed with historical_import.", at)
    try:
        moment = datetime.fromisoformat(string(value, at, nullable=False) or "")
    except ValueError:
        raise Problem("Expected an ISO 8601 date-time.", at) from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    if moment > now():
        raise Problem("consented_at must be in the past.", at)
    return moment


def limits_arg(text: str) -> tuple[int, int]:
    burst, _, steady = text.partition(",")
    try:
        pair = int(burst), int(steady)
    except ValueError:
        raise argparse.ArgumentTypeError("expected BURST,STEADY, e.g. 75,750") from None
    if min(pair) < 1:
        raise argparse.ArgumentTypeError("limits must be positive")
    return pair


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8083)
    parser.add_argument("--api-key", default=DEFAULT_KEY)
    parser.add_argument("--job-delay-ms", type=float, default=300, help="how long a bulk job stays queued, then processing")
    parser.add_argument("--import-limits", type=limits_arg, default=SPEC_LIMITS[IMPORT],
                        help="POST /api/profile-import requests per 1 s and per 60 s: BURST,STEADY")
    parser.add_argument("--bulk-limits", type=limits_arg, default=SPEC_LIMITS[BULK],
                        help="POST /api/profile-bulk-import-jobs requests per 1 s and per 60 s: BURST,STEADY")
    parser.add_argument("--other-limits", type=limits_arg, default=None,
                        help="BURST,STEADY for every other endpoint (default: each endpoint's limits from the spec)")
    args = parser.parse_args(argv)
    limits = {name: args.other_limits or pair for name, pair in SPEC_LIMITS.items()}
    limits[IMPORT], limits[BULK] = args.import_limits, args.bulk_limits
    serve(Sandbox(args.api_key, limits, args.job_delay_ms / 1000), "klaviyo", args.host, args.port)


if __name__ == "__main__":
    main()
