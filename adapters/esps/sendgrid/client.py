"""SendGrid Marketing Contacts (v3): contacts by email, always through asynchronous jobs.

- Upserts: ``PUT /v3/marketing/contacts`` (1 to 30,000 contacts, 6 MB) answers a job id;
  ``GET /v3/marketing/contacts/imports/{id}`` is polled until the job ends, and its
  errored contacts name the refused items by position. Nothing counts as sent before.
- Custom fields are written by id: the mapping names them, the adapter looks their ids up
  (``/v3/marketing/field_definitions``) once and again when a name is unknown.
- Consent: contacts carry no subscription state, so an upsert never resubscribes anyone;
  an unsubscribe is pushed as a global suppression (``/v3/asm/suppressions/global``).
- Erasure and retiring a duplicate: the contact is deleted (SendGrid has no archive).

Rate limits come from the ``X-RateLimit-*`` headers; an exhausted budget pauses every sync
process until ``X-RateLimit-Reset``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from adapters.esps.base import Held, OnJob
from adapters.esps.fields import MappingEntry, normalize
from adapters.esps.guard import EspGuard
from adapters.esps.http import EspHttp, chunks_by_size, download, seconds_until, wait_for_job
from adapters.esps.sendgrid.member import RESERVED, contact_body
from schemas.errors import EspMisconfigured, EspRejected, EspTimeout, EspUnavailable, MergetagError
from schemas.events import Scalar
from schemas.profile import Profile

KIND = "sendgrid"
BATCH_LIMIT = 30_000
MAX_JOB_BYTES = 5_500_000  # under the 6 MB request limit
_TYPES = {"Text": "text", "Number": "number", "Date": "date"}
_FINISHED = {"completed", "errored", "failed"}


class SendGrid:
    """The adapter: one SendGrid account.

    Parameters:
      base_url: API root (``https://api.sendgrid.com`` or the sandbox's).
      api_key: the API key (Bearer).
      fields: this account's field mapping (reserved field names or custom field names).
      list_id: a list every upserted contact joins (optional).
      timeout: seconds per request.
      job_timeout: seconds an import job may take before the send is retried.
      guard: the account's shared guard.
      name: the target's name (default ``sendgrid``).
    """

    kind = KIND
    batch_limit = BATCH_LIMIT
    prefers_bulk = True

    def __init__(self, base_url: str, api_key: str, fields: Mapping[str, MappingEntry], *, list_id: str | None = None,
                 timeout: float = 10.0, job_timeout: float = 300.0, guard: EspGuard | None = None, name: str = KIND) -> None:
        self.name = name
        self._fields = normalize(fields)
        self._list = list_id
        self._job_timeout = job_timeout
        self._definitions: dict[str, tuple[str, str]] | None = None
        self.http = EspHttp("sendgrid", base_url, {"Authorization": f"Bearer {api_key}"}, timeout=timeout, guard=guard,
                            describe=_describe, rate=_rate)

    def member(self, profile: Profile) -> dict[str, Any] | None:
        return contact_body(profile, self._fields)

    def key(self, member: dict[str, Any]) -> str:
        return str(member["contact"]["email"]).lower()

    def fields(self, member: dict[str, Any]) -> dict[str, Scalar]:
        contact = member["contact"]
        return {**{k: v for k, v in contact.items() if k in RESERVED}, **contact.get("custom_fields", {})}

    def unsubscribed(self, member: dict[str, Any]) -> bool:
        return bool(member.get("unsubscribe"))

    async def upsert(self, member: dict[str, Any], on_job: OnJob | None = None) -> None:
        refused = await self.upsert_batch([member], on_job)
        if refused:
            raise EspRejected(next(iter(refused.values())))

    async def upsert_batch(self, members: list[dict[str, Any]], on_job: OnJob | None = None) -> dict[str, str]:
        """Suppressions first (an unsubscribe must land even when its contact is refused), then
        import jobs (split to stay under 6 MB), each polled until it ends.

        Raises EspUnavailable(``esp_timeout``) for any failure once a job was accepted: the job may
        still run, so the caller keeps its send lease (nothing may overtake it) until it runs out.
        """
        if len(members) > BATCH_LIMIT:
            raise ValueError(f"at most {BATCH_LIMIT} contacts per request")
        leaving = [self.key(m) for m in members if self.unsubscribed(m)]
        if leaving:
            await self.http.request("POST", "/v3/asm/suppressions/global", {"recipient_emails": leaving})
        definitions = await self._field_ids()
        contacts = [self._by_id(m["contact"], definitions) for m in members]
        refused: dict[str, str] = {}
        for chunk in chunks_by_size(contacts, MAX_JOB_BYTES):
            refused.update(await self._import(chunk, on_job))
        return refused

    def _by_id(self, contact: dict[str, Any], definitions: dict[str, tuple[str, str]]) -> dict[str, Any]:
        """Custom fields renamed to their ids (SendGrid writes them by id only)."""
        out = {k: v for k, v in contact.items() if k != "custom_fields"}
        custom = {}
        for name, value in contact.get("custom_fields", {}).items():
            if name not in definitions:
                # The mapping names a field the account lacks: an operator's fix, alarmed and retried until then.
                raise EspMisconfigured(f"sendgrid custom field {name} is not defined")
            custom[definitions[name][0]] = value
        if custom:
            out["custom_fields"] = custom
        return out

    async def _import(self, contacts: list[dict[str, Any]], on_job: OnJob | None) -> dict[str, str]:
        body: dict[str, Any] = {"contacts": contacts}
        if self._list:
            body["list_ids"] = [self._list]
        _, answer = await self.http.request("PUT", "/v3/marketing/contacts", body)
        job_id = (answer or {}).get("job_id")
        if not job_id:
            raise EspUnavailable("sendgrid import answer without a job id")
        if on_job is not None:
            await on_job(str(job_id))
        job: dict[str, Any] = {}

        async def finished() -> bool:
            _, status = await self.http.request("GET", f"/v3/marketing/contacts/imports/{job_id}")
            job.update(status or {})
            return job.get("status") in _FINISHED

        try:
            await wait_for_job(finished, self._job_timeout, "sendgrid")
            results = job.get("results") or {}
            errored = int(results.get("errored_count") or 0)
            refused = await self._errors(str(results.get("errors_url") or ""), contacts) if errored else {}
        except MergetagError as exc:
            raise EspTimeout(f"sendgrid import job not confirmed: {exc.code}") from None
        if job.get("status") == "failed" and not errored:
            raise EspUnavailable("sendgrid import job failed")
        if len(refused) < errored:
            # Never count a refusal we cannot place as a success: the whole job is sent again.
            raise EspUnavailable("sendgrid import job reported errors it did not name")
        return refused

    async def _errors(self, url: str, contacts: list[dict[str, Any]]) -> dict[str, str]:
        """The job's errored contacts, by email, from the errors file (a CSV download behind a
        pre-signed URL: fetched without the API key, which must never travel to another host)."""
        sent = {str(c.get("email", "")).lower() for c in contacts}
        text = (await download(url, "sendgrid", self._job_timeout)).decode("utf-8", "replace")
        refused: dict[str, str] = {}
        for row in csv.DictReader(io.StringIO(text)):
            fields = {k.strip().lower(): v for k, v in row.items() if k}
            email = str(fields.get("email") or "").lower()
            if email in sent:
                refused[email] = f"sendgrid {_reason(fields.get('error') or fields.get('errors') or '')}"
        return refused

    async def _field_ids(self, refresh: bool = False) -> dict[str, tuple[str, str]]:
        """Custom field name -> (id, type), cached; looked up again when the mapping names an unknown one."""
        wanted = {spec.tag for spec in normalize(self._fields).values() if spec.tag not in RESERVED}
        if self._definitions is None or refresh or not wanted <= set(self._definitions):
            _, body = await self.http.request("GET", "/v3/marketing/field_definitions")
            self._definitions = {f["name"]: (f["id"], _TYPES.get(f.get("field_type", "Text"), "text"))
                                 for f in (body or {}).get("custom_fields", []) if isinstance(f, dict)}
        return self._definitions

    async def _contact_ids(self, email: str) -> list[str]:
        _, body = await self.http.request("POST", "/v3/marketing/contacts/search/emails", {"emails": [email]}, gone_ok=True)
        found = ((body or {}).get("result") or {}).values()
        return [c["contact"]["id"] for c in found if isinstance(c, dict) and isinstance(c.get("contact"), dict)]

    async def erase(self, email: str) -> None:
        """Delete the contact (an unknown one is already gone)."""
        ids = await self._contact_ids(email)
        if ids:
            await self.http.request("DELETE", f"/v3/marketing/contacts?ids={','.join(ids)}")

    async def unsubscribe(self, email: str) -> None:
        """A global suppression: SendGrid then sends the address no marketing mail at all."""
        await self.http.request("POST", "/v3/asm/suppressions/global", {"recipient_emails": [email]})

    async def retire(self, email: str) -> None:
        """SendGrid has no archive: the contact is deleted, so it is on no list and in no campaign."""
        await self.erase(email)

    async def job_done(self, job_id: str) -> bool:
        status, job = await self.http.request("GET", f"/v3/marketing/contacts/imports/{job_id}", gone_ok=True)
        return status == 404 or (job or {}).get("status") in _FINISHED

    async def held(self, email: str) -> Held | None:
        _, body = await self.http.request("POST", "/v3/marketing/contacts/search/emails", {"emails": [email]}, gone_ok=True)
        found = [c["contact"] for c in ((body or {}).get("result") or {}).values() if isinstance(c, dict) and c.get("contact")]
        if not found:
            return None
        contact = found[0]
        _, suppressed = await self.http.request("GET", f"/v3/asm/suppressions/global/{quote(email, safe='')}")
        fields = {**{k: v for k, v in contact.items() if k in RESERVED}, **(contact.get("custom_fields") or {})}
        return Held(fields, bool(suppressed))

    async def field_problems(self) -> list[str]:
        definitions = await self._field_ids(refresh=True)
        found = []
        for trait, spec in sorted(normalize(self._fields).items()):
            if spec.tag in RESERVED:
                if spec.type not in (None, "text"):
                    found.append(f"{trait}: {spec.tag} is a text field, the mapping converts to {spec.type}")
            elif spec.tag not in definitions:
                found.append(f"{trait}: custom field {spec.tag} is not defined")
            elif spec.type is not None and definitions[spec.tag][1] != spec.type:
                found.append(f"{trait}: {spec.tag} is a {definitions[spec.tag][1]} field, the mapping converts to {spec.type}")
        return found

    async def close(self) -> None:
        await self.http.close()


def _reason(message: str) -> str:
    """A short code for SendGrid's free-text error (which may quote the value), never the text."""
    text = message.lower()
    for word, code in (("email", "invalid_email"), ("phone", "invalid_phone"), ("custom", "invalid_custom_field"),
                       ("length", "too_long"), ("date", "invalid_date"), ("number", "invalid_number")):
        if word in text:
            return code
    return "invalid_contact"


def _describe(status: int, body: dict[str, Any]) -> str:
    """SendGrid's error fields (``contacts[3].email``); never the messages, which may quote values."""
    errors = [e for e in body.get("errors", []) if isinstance(e, dict)]
    return ", ".join(str(e.get("field") or "") for e in errors if e.get("field"))


def _rate(headers: Mapping[str, str]) -> tuple[int | None, float | None]:
    try:
        remaining = int(headers["X-RateLimit-Remaining"]) if "X-RateLimit-Remaining" in headers else None
    except ValueError:
        return None, None
    return remaining, seconds_until(headers.get("X-RateLimit-Reset"))
