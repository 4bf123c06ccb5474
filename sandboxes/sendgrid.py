"""A SendGrid Marketing Contacts sandbox: a real HTTP server that enforces the parts of
SendGrid's v3 contract mergetag's adapter relies on. State lives in memory.

Enforced:
  - ``Authorization: Bearer <key>``, else 401 ``{"errors": [{"field": null, "message": "authorization required"}]}``.
  - ``PUT /v3/marketing/contacts``: body at most 6,000,000 bytes (413); 1..30,000 contacts,
    only the spec's ContactRequest properties, one identifier per contact, string reserved
    fields, ``custom_fields`` keyed by existing field *id*, known ``list_ids`` (404). Request
    problems answer 400 with a ``field`` pointer such as ``contacts[3].custom_fields.e9_T``.
    Content problems (email or phone format, length limits, a custom value of the wrong type)
    only make that contact errored in the job. 202 ``{"job_id"}``; the job stays ``pending``
    for ``--job-delay-ms``, then upserts by email (omitted fields and custom fields keep their
    value) and ends ``completed`` (no errors), ``errored`` (some) or ``failed`` (all).
  - ``GET /v3/marketing/contacts/imports/{id}``: the spec's ContactImport.
  - ``POST /v3/marketing/contacts/search/emails``: up to 100 emails, 200 with ``result``
    (custom fields by *name*), 404 when none matches, 400 for an invalid address.
  - ``GET /v3/marketing/contacts/{id}``; ``DELETE /v3/marketing/contacts?ids=...`` (a delete job).
  - ``GET /v3/marketing/field_definitions`` (SendGrid's documented shape, not in the spec).
  - Global unsubscribes ``/v3/asm/suppressions/global``: a contacts PUT never lifts one.
  - Fixed-window rate limits, one window for ``PUT /v3/marketing/contacts`` and one for every
    other call, with ``X-RateLimit-Limit/Remaining/Reset`` (epoch seconds) on every
    authenticated response and 429 ``too many requests`` beyond the limit.

A job's ``errors_url`` is a file download, as at SendGrid: a CSV (``email,error``) under
``/_sandbox/files/``, fetched without the API key (one sent anyway is refused);
``GET /_sandbox/contacts`` lists every contact and suppression, ``POST /_sandbox/job-delay {"ms"}`` sets how long new jobs
stay pending; the ``/_sandbox`` controls of
:mod:`sandboxes.kit`.

Run: ``python -m sandboxes.sendgrid --port 8082``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import math
import re
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

from aiohttp import web

from sandboxes.kit import SandboxBase, json_body, serve

DEFAULT_KEY = "SG.sandbox.0000000000000000000000"
DEFAULT_FIELDS = "ltv:Number,orders:Number,last_order:Date,tier:Text"
MAX_BODY = 6_000_000
MAX_CONTACTS = 30_000
MAX_SEARCH = 100
MAX_ALTERNATE_EMAILS = 5
FIELD_TYPES = {"Text": "T", "Number": "N", "Date": "D"}
IDENTIFIERS = ("email", "phone_number_id", "external_id", "anonymous_id")
# ContactRequest's string properties and their maxLength (None: no limit in the spec).
TEXT_FIELDS: dict[str, int | None] = {
    "email": 254, "phone_number_id": None, "external_id": 254, "anonymous_id": 254,
    "first_name": 50, "last_name": 50, "address_line_1": 100, "address_line_2": 100,
    "city": 60, "state_province_region": 50, "postal_code": None, "country": 50,
}
CONTACT_KEYS = {*TEXT_FIELDS, "alternate_emails", "custom_fields"}
# Shown with "" when unset, as in the spec's search example.
SHOWN_BLANK = ("first_name", "last_name", "unique_name", "email", "address_line_1", "address_line_2", "city",
               "state_province_region", "country", "postal_code", "phone_number", "whatsapp", "line", "facebook")
RESERVED_FIELDS = [
    *((name, "Text", False) for name in (
        "first_name", "last_name", "email", "alternate_emails", "address_line_1", "address_line_2", "city",
        "state_province_region", "postal_code", "country", "phone_number_id", "external_id", "anonymous_id")),
    ("created_at", "Date", True), ("updated_at", "Date", True), ("contact_id", "Text", True),
]
EMAIL = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,63}$")
PHONE = re.compile(r"^\+[1-9][0-9]{6,14}$")
US_DATE = re.compile(r"^(0[1-9]|1[0-2])/(0[1-9]|[12][0-9]|3[01])/[0-9]{4}$")


def sg_error(status: int, message: str, field: str | None = None) -> web.Response:
    return sg_errors(status, [(field, message)])


def sg_errors(status: int, errors: list[tuple[str | None, str]]) -> web.Response:
    return web.json_response({"errors": [{"field": field, "message": message} for field, message in errors]}, status=status)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Window:
    """A fixed window aligned on the epoch; remembers its busiest window and its refusals."""

    limit: int
    seconds: float
    index: int = -1
    used: int = 0
    peak: int = 0
    throttled: int = 0

    def take(self, now: float) -> bool:
        index = int(now // self.seconds)
        if index != self.index:
            self.index, self.used = index, 0
        if self.used >= self.limit:
            self.throttled += 1
            return False
        self.used += 1
        self.peak = max(self.peak, self.used)
        return True

    def headers(self) -> dict[str, str]:
        return {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(max(0, self.limit - self.used)),
                "X-RateLimit-Reset": str(math.ceil((self.index + 1) * self.seconds))}

    def stats(self) -> dict[str, Any]:
        return {"limit": self.limit, "window_s": self.seconds, "peak_per_window": self.peak, "throttled": self.throttled}


@dataclass
class Job:
    id: str
    job_type: str
    requested: int
    started_at: str
    status: str = "pending"
    finished_at: str | None = None
    created: int = 0
    updated: int = 0
    deleted: int = 0
    errors: list[dict[str, Any]] | None = None


class Sandbox(SandboxBase):
    """The in-memory contact store, jobs, suppressions and the contract checks.

    Parameters:
      api_key: the only key accepted.
      custom_fields: name -> "Text" | "Number" | "Date", defined at start.
      list_ids: the lists that exist.
      job_delay_s: how long a job stays ``pending``.
      upsert_limit/upsert_window_s: the window for ``PUT /v3/marketing/contacts``.
      other_limit/other_window_s: the window shared by every other call.
    """

    def __init__(self, api_key: str, custom_fields: dict[str, str], list_ids: list[str], job_delay_s: float = 0.3,
                 upsert_limit: int = 600, upsert_window_s: float = 60, other_limit: int = 600, other_window_s: float = 60) -> None:
        super().__init__()
        self.api_key = api_key
        self.fields: dict[str, tuple[str, str]] = {}
        for n, (name, kind) in enumerate(custom_fields.items(), start=1):
            if kind not in FIELD_TYPES:
                raise ValueError(f"custom field {name}: type must be one of {sorted(FIELD_TYPES)}")
            self.fields[f"e{n}_{FIELD_TYPES[kind]}"] = (name, kind)
        self.list_ids = set(list_ids)
        self.job_delay_s = job_delay_s
        self.windows = {"upsert": Window(upsert_limit, upsert_window_s), "other": Window(other_limit, other_window_s)}
        self.contacts: dict[str, dict[str, Any]] = {}
        self.by_email: dict[str, str] = {}
        self.suppressed: dict[str, str] = {}
        self.jobs: dict[str, Job] = {}
        self.last_upsert_at: float | None = None
        self.upsert_min_gap_ms: float | None = None
        """The least time between two upsert jobs accepted (since the stats were last reset)."""

    def routes(self, app: web.Application) -> None:
        app.on_response_prepare.append(self._rate_headers)
        app.router.add_put("/v3/marketing/contacts", self.upsert)
        app.router.add_delete("/v3/marketing/contacts", self.delete)
        app.router.add_get("/v3/marketing/contacts/imports/{id}", self.import_status)
        app.router.add_get("/_sandbox/files/imports/{id}/errors.csv", self.import_errors)
        app.router.add_post("/v3/marketing/contacts/search/emails", self.search_emails)
        app.router.add_get("/v3/marketing/contacts/{id}", self.get_contact)
        app.router.add_get("/v3/marketing/field_definitions", self.field_definitions)
        app.router.add_post("/v3/asm/suppressions/global", self.suppress)
        app.router.add_get("/v3/asm/suppressions/global/{email}", self.suppression)
        app.router.add_delete("/v3/asm/suppressions/global/{email}", self.unsuppress)
        app.router.add_get("/_sandbox/contacts", self.all_contacts)
        app.router.add_post("/_sandbox/job-delay", self._job_delay)

    def error(self, status: int, title: str, detail: str) -> web.Response:
        return sg_error(status, detail)

    async def admit(self, request: web.Request) -> web.StreamResponse | None:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() != self.api_key:
            return sg_error(401, "authorization required")
        group = "upsert" if request.method == "PUT" and request.path == "/v3/marketing/contacts" else "other"
        window = self.windows[group]
        admitted = window.take(time.time())
        request["rate_limit"] = window.headers()
        return None if admitted else sg_error(429, "too many requests")

    async def _rate_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(request.get("rate_limit", {}))

    def extra_stats(self) -> dict[str, Any]:
        return {"rate_limits": {group: window.stats() for group, window in self.windows.items()},
                "throttled": sum(window.throttled for window in self.windows.values()),
                "jobs_running": sum(1 for job in self.jobs.values() if job.status == "pending"),
                "upsert_min_gap_ms": self.upsert_min_gap_ms}

    async def _job_delay(self, request: web.Request) -> web.Response:
        """``POST /_sandbox/job-delay {"ms"}``: how long jobs accepted from now on stay pending."""
        body = await json_body(request) or {}
        self.job_delay_s = float(body.get("ms", self.job_delay_s * 1000)) / 1000
        return web.json_response({"job_delay_ms": self.job_delay_s * 1000})

    async def _reset_stats(self, request: web.Request) -> web.Response:
        for window in self.windows.values():
            window.peak, window.throttled = window.used, 0
        self.last_upsert_at, self.upsert_min_gap_ms = None, None
        return await super()._reset_stats(request)

    def _base_url(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    # Upserts

    async def upsert(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if len(raw) > MAX_BODY:
            return sg_error(413, f"request body must be at most {MAX_BODY} bytes")
        body = await json_body(request)
        if not isinstance(body, dict):
            return sg_error(400, "request body must be a JSON object")
        problems = [(key, "unknown field") for key in body if key not in {"list_ids", "contacts"}]
        list_ids = body.get("list_ids", [])
        if not isinstance(list_ids, list) or not all(isinstance(item, str) for item in list_ids):
            problems.append(("list_ids", "must be an array of strings"))
            list_ids = []
        contacts = body.get("contacts")
        if not isinstance(contacts, list):
            problems.append(("contacts", "must be an array of contacts"))
            contacts = []
        elif not contacts:
            problems.append(("contacts", "at least 1 contact is required"))
        elif len(contacts) > MAX_CONTACTS:
            problems.append(("contacts", f"at most {MAX_CONTACTS} contacts per request"))
            contacts = []
        accepted: list[tuple[int, dict[str, Any]]] = []
        errored: list[dict[str, Any]] = []
        for index, contact in enumerate(contacts):
            shape, content = self._check_contact(index, contact)
            problems.extend(shape)
            if shape:
                continue
            if content:
                errored.append({"index": index, "email": contact.get("email"), "message": content})
            else:
                accepted.append((index, contact))
        if problems:
            return sg_errors(400, problems)
        unknown = [(f"list_ids[{i}]", "list not found") for i, list_id in enumerate(list_ids) if list_id not in self.list_ids]
        if unknown:
            return sg_errors(404, unknown)
        job = self._job("upsert", len(contacts))
        job.errors = errored
        now = time.monotonic()
        if self.last_upsert_at is not None:
            gap_ms = (now - self.last_upsert_at) * 1000
            self.upsert_min_gap_ms = gap_ms if self.upsert_min_gap_ms is None else min(self.upsert_min_gap_ms, gap_ms)
        self.last_upsert_at = now
        asyncio.get_running_loop().call_later(self.job_delay_s, self._run_upsert, job, accepted, list(list_ids))
        return web.json_response({"job_id": job.id}, status=202)

    def _check_contact(self, index: int, contact: Any) -> tuple[list[tuple[str, str]], str | None]:
        """(request-level problems that fail the whole PUT, the content problem that only errors this contact)."""
        at = f"contacts[{index}]"
        if not isinstance(contact, dict):
            return [(at, "must be an object")], None
        shape = [(f"{at}.{key}", "unknown field") for key in contact if key not in CONTACT_KEYS]
        shape += [(f"{at}.{key}", "must be a string") for key in TEXT_FIELDS if key in contact and not isinstance(contact[key], str)]
        alternates = contact.get("alternate_emails", [])
        if not isinstance(alternates, list) or not all(isinstance(item, str) for item in alternates):
            shape.append((f"{at}.alternate_emails", "must be an array of strings"))
        custom = contact.get("custom_fields", {})
        if not isinstance(custom, dict):
            shape.append((f"{at}.custom_fields", "must be an object keyed by custom field id"))
            custom = {}
        shape += [(f"{at}.custom_fields.{key}", "custom field id not found (custom_fields are keyed by field id)")
                  for key in custom if key not in self.fields]
        if not any(isinstance(contact.get(key), str) and contact[key] for key in IDENTIFIERS):
            shape.append((at, "one of email, phone_number_id, external_id or anonymous_id is required"))
        if shape:
            return shape, None
        return [], self._content_problem(contact)

    def _content_problem(self, contact: dict[str, Any]) -> str | None:
        for key, limit in TEXT_FIELDS.items():
            if limit is not None and len(contact.get(key, "")) > limit:
                return f"{key} must be at most {limit} characters"
        if contact.get("email") and not EMAIL.match(contact["email"]):
            return "email is not a valid email address"
        if contact.get("phone_number_id") and not PHONE.match(contact["phone_number_id"]):
            return "phone_number_id is not a valid phone number"
        alternates = contact.get("alternate_emails", [])
        if len(alternates) > MAX_ALTERNATE_EMAILS:
            return f"at most {MAX_ALTERNATE_EMAILS} alternate_emails"
        if not all(EMAIL.match(item) and len(item) <= 254 for item in alternates):
            return "alternate_emails contains an invalid email address"
        for field_id, value in contact.get("custom_fields", {}).items():
            name, kind = self.fields[field_id]
            if not _valid_value(kind, value):
                return f"custom field {field_id} ({name}) expects a {kind} value"
        return None

    def _job(self, job_type: str, requested: int) -> Job:
        job = Job(id=str(uuid.uuid4()), job_type=job_type, requested=requested, started_at=now_iso())
        self.jobs[job.id] = job
        return job

    def _finish(self, job: Job, failures: int) -> None:
        job.finished_at = now_iso()
        job.status = "completed" if not failures else "failed" if failures >= job.requested else "errored"

    def _run_upsert(self, job: Job, accepted: list[tuple[int, dict[str, Any]]], list_ids: list[str]) -> None:
        for _, contact in accepted:
            stored = self._find(contact)
            stamp = now_iso()
            if stored is None:
                stored = {"id": str(uuid.uuid4()), "list_ids": [], "alternate_emails": [], "custom_fields": {}, "created_at": stamp}
                self.contacts[stored["id"]] = stored
                job.created += 1
            else:
                job.updated += 1
            for key in TEXT_FIELDS:
                if key in contact:
                    stored[key] = contact[key].lower() if key == "email" else contact[key]
            if "alternate_emails" in contact:
                stored["alternate_emails"] = [item.lower() for item in contact["alternate_emails"]]
            stored["custom_fields"] = {**stored["custom_fields"], **contact.get("custom_fields", {})}
            stored["list_ids"] = [*stored["list_ids"], *(i for i in list_ids if i not in stored["list_ids"])]
            stored["updated_at"] = stamp
            if stored.get("email"):
                self.by_email[stored["email"]] = stored["id"]
            written = {key: stored[key] for key in TEXT_FIELDS if key != "email" and key in stored}
            self.record_write(stored.get("email") or _identifier(stored), {**written, **self._by_name(stored)})
        self._finish(job, len(job.errors or []))

    def _find(self, contact: dict[str, Any]) -> dict[str, Any] | None:
        """Email identifies a contact; without one, the first other identifier sent does."""
        if contact.get("email"):
            contact_id = self.by_email.get(contact["email"].lower())
            return self.contacts.get(contact_id) if contact_id else None
        for key in IDENTIFIERS[1:]:
            if contact.get(key):
                return next((c for c in self.contacts.values() if c.get(key) == contact[key]), None)
        return None

    def _by_name(self, stored: dict[str, Any]) -> dict[str, Any]:
        return {self.fields[field_id][0]: value for field_id, value in stored["custom_fields"].items()}

    # Jobs

    async def import_status(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            return sg_error(404, "job not found", "id")
        results: dict[str, Any] = {"requested_count": job.requested, "created_count": job.created, "updated_count": job.updated,
                                   "deleted_count": job.deleted, "errored_count": 0}
        body: dict[str, Any] = {"id": job.id, "status": job.status, "job_type": job.job_type, "results": results,
                                "started_at": job.started_at}
        if job.finished_at:
            results["errored_count"] = len(job.errors or [])
            results["errors_url"] = f"{self._base_url(request)}/_sandbox/files/imports/{job.id}/errors.csv"
            body["finished_at"] = job.finished_at
        return web.json_response(body)

    async def import_errors(self, request: web.Request) -> web.Response:
        """The errored contacts as a downloadable CSV (``email,error``), as SendGrid hands out a file
        behind a pre-signed URL: no API key, and one sent anyway is refused."""
        if "Authorization" in request.headers:
            return web.Response(status=400, text="Only one auth mechanism allowed")
        job = self.jobs.get(request.match_info["id"])
        if job is None or job.finished_at is None:
            return web.Response(status=404, text="NoSuchKey")
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["email", "error"])
        for error in job.errors or []:
            writer.writerow([error.get("email") or "", error["message"]])
        return web.Response(text=out.getvalue(), content_type="text/csv")

    # Reads and deletes

    def _render(self, stored: dict[str, Any], request: web.Request) -> dict[str, Any]:
        shown: dict[str, Any] = {"id": stored["id"], **{key: stored.get(key, "") for key in SHOWN_BLANK}}
        shown.update({key: stored[key] for key in IDENTIFIERS[1:] if key in stored})
        shown.update({
            "alternate_emails": list(stored["alternate_emails"]), "list_ids": list(stored["list_ids"]), "segment_ids": [],
            "custom_fields": self._by_name(stored), "created_at": stored["created_at"], "updated_at": stored["updated_at"],
            "_metadata": {"self": f"{self._base_url(request)}/v3/marketing/contacts/{stored['id']}"},
        })
        return shown

    async def search_emails(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        emails = body.get("emails") if isinstance(body, dict) else None
        if not isinstance(emails, list) or not all(isinstance(item, str) for item in emails):
            return sg_error(400, "emails must be an array of strings", "emails")
        wanted = [item.lower() for item in emails if item]
        if not wanted:
            return sg_error(400, "at least 1 email is required", "emails")
        if len(wanted) > MAX_SEARCH:
            return sg_error(400, f"at most {MAX_SEARCH} emails per request", "emails")
        invalid = [(f"emails[{i}]", "invalid email address") for i, item in enumerate(emails)
                   if item and (len(item) > 100 or not EMAIL.match(item))]
        if invalid:
            return sg_errors(400, invalid)
        result: dict[str, Any] = {}
        for email in wanted:
            stored = self._by_any_email(email)
            result[email] = {"contact": self._render(stored, request)} if stored else {"error": "contact not found"}
        if all("error" in entry for entry in result.values()):
            return sg_error(404, "no contacts found")
        return web.json_response({"result": result})

    def _by_any_email(self, email: str) -> dict[str, Any] | None:
        contact_id = self.by_email.get(email)
        if contact_id:
            return self.contacts[contact_id]
        return next((c for c in self.contacts.values() if email in c["alternate_emails"]), None)

    async def get_contact(self, request: web.Request) -> web.Response:
        stored = self.contacts.get(request.match_info["id"])
        if stored is None:
            return sg_error(404, "contact not found", "id")
        return web.json_response(self._render(stored, request))

    async def delete(self, request: web.Request) -> web.Response:
        ids = [item for item in request.query.get("ids", "").split(",") if item]
        everything = request.query.get("delete_all_contacts") == "true"
        if bool(ids) == everything:
            return sg_error(400, "set either ids or delete_all_contacts=true", "ids")
        targets = list(self.contacts) if everything else ids
        job = self._job("delete", len(targets))
        job.errors = []
        asyncio.get_running_loop().call_later(self.job_delay_s, self._run_delete, job, targets)
        return web.json_response({"job_id": job.id}, status=202)

    def _run_delete(self, job: Job, ids: list[str]) -> None:
        for index, contact_id in enumerate(ids):
            stored = self.contacts.pop(contact_id, None)
            if stored is None:
                (job.errors or []).append({"index": index, "email": None, "message": "contact not found"})
                continue
            if stored.get("email"):
                self.by_email.pop(stored["email"], None)
            job.deleted += 1
        self._finish(job, len(job.errors or []))

    async def field_definitions(self, request: web.Request) -> web.Response:
        base = f"{self._base_url(request)}/v3/marketing/field_definitions"
        custom = [{"id": field_id, "name": name, "field_type": kind, "_metadata": {"self": f"{base}/{field_id}"}}
                  for field_id, (name, kind) in self.fields.items()]
        reserved = []
        for n, (name, kind, read_only) in enumerate(RESERVED_FIELDS):
            field = {"id": f"_rf{n}_{FIELD_TYPES[kind]}", "name": name, "field_type": kind}
            if read_only:
                field["read_only"] = True
            reserved.append(field)
        return web.json_response({"custom_fields": custom, "reserved_fields": reserved,
                                  "_metadata": {"self": base, "count": len(custom) + len(reserved)}})

    # Global unsubscribes (ASM)

    async def suppress(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        emails = body.get("recipient_emails") if isinstance(body, dict) else None
        if not isinstance(emails, list) or not emails or not all(isinstance(item, str) for item in emails):
            return sg_error(400, "recipient_emails must be a non-empty array of strings", "recipient_emails")
        invalid = [(f"recipient_emails[{i}]", "invalid email address") for i, item in enumerate(emails) if not EMAIL.match(item)]
        if invalid:
            return sg_errors(400, invalid)
        for email in emails:
            self.suppressed.setdefault(email.lower(), now_iso())
        return web.json_response({"recipient_emails": emails}, status=201)

    async def suppression(self, request: web.Request) -> web.Response:
        email = request.match_info["email"]
        return web.json_response({"recipient_email": email} if email.lower() in self.suppressed else {})

    async def unsuppress(self, request: web.Request) -> web.Response:
        self.suppressed.pop(request.match_info["email"].lower(), None)
        return web.Response(status=204)

    # Sandbox view

    async def all_contacts(self, request: web.Request) -> web.Response:
        contacts = [{**self._render(stored, request), "suppressed": stored.get("email", "") in self.suppressed}
                    for stored in self.contacts.values()]
        return web.json_response({"contacts": contacts, "suppressions": sorted(self.suppressed)})


def _identifier(stored: dict[str, Any]) -> str:
    return next(stored[key] for key in IDENTIFIERS if stored.get(key))


def _valid_value(kind: str, value: Any) -> bool:
    """Text takes a string, Number a JSON number, Date ``YYYY-MM-DD``, ISO 8601 or ``MM/DD/YYYY``; "" clears any."""
    if value == "":
        return True
    if kind == "Number":
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not isinstance(value, str):
        return False
    if kind == "Date":
        if US_DATE.match(value):
            return True
        try:
            (date if len(value) == 10 else datetime).fromisoformat(value)
        except ValueError:
            return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--api-key", default=DEFAULT_KEY)
    parser.add_argument("--custom-fields", default=DEFAULT_FIELDS, help="name:Text|Number|Date,... defined at start (ids e1_N, e2_N, ...)")
    parser.add_argument("--list-ids", default="sandbox-list", help="comma-separated list ids that exist")
    parser.add_argument("--job-delay-ms", type=float, default=300, help="how long an upsert or delete job stays pending")
    parser.add_argument("--rate-limit", type=int, default=600, help="PUT /v3/marketing/contacts requests per window")
    parser.add_argument("--rate-window", type=float, default=60, help="seconds per PUT contacts window")
    parser.add_argument("--other-rate-limit", type=int, default=600, help="requests per window for every other call")
    parser.add_argument("--other-rate-window", type=float, default=60, help="seconds per window for every other call")
    args = parser.parse_args(argv)
    if min(args.rate_limit, args.rate_window, args.other_rate_limit, args.other_rate_window) <= 0:
        parser.error("rate limits and windows must be positive")
    fields = dict(item.split(":", 1) for item in args.custom_fields.split(",") if item)
    sandbox = Sandbox(args.api_key, fields, [item for item in args.list_ids.split(",") if item], args.job_delay_ms / 1000,
                      args.rate_limit, args.rate_window, args.other_rate_limit, args.other_rate_window)
    serve(sandbox, "sendgrid", args.host, args.port)


if __name__ == "__main__":
    main()
