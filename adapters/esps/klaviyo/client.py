"""Klaviyo (API revision 2026-07-15): profiles by email, JSON:API bodies.

- One profile: ``POST /api/profile-import`` (an omitted attribute is left alone, ``null`` clears it).
- A backlog: ``POST /api/profile-bulk-import-jobs`` (up to 10,000 profiles, 5 MB), polled
  until complete; its ``import-errors`` name the refused items by position.
- Consent: profile writes never touch subscriptions, so nobody is ever (re)subscribed by
  mergetag; an unsubscribe is pushed with ``profile-subscription-bulk-delete-jobs``.
- Erasure: ``data-privacy-deletion-jobs``. Klaviyo has no archive: a retired duplicate is left.

Mapping tags: a standard attribute (``first_name``, ``location.city``, ...) or any other name,
which becomes a custom property. Rate limits are per account, in buckets with a 1 s burst
and a 60 s steady window; responses carry ``RateLimit-*`` headers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from adapters.esps.base import Held, OnJob
from adapters.esps.fields import MappingEntry, normalize
from adapters.esps.guard import EspGuard, Rates
from adapters.esps.http import EspHttp, chunks_by_size, wait_for_job
from adapters.esps.klaviyo.member import LOCATION, STANDARD, flatten, profile_body
from schemas.errors import EspTimeout, EspUnavailable, MergetagError
from schemas.events import Scalar
from schemas.profile import Profile

KIND = "klaviyo"
REVISION = "2026-07-15"
CONTENT_TYPE = "application/vnd.api+json"
BATCH_LIMIT = 10_000
MAX_JOB_BYTES = 4_500_000  # under the 5 MB request limit, with room for the envelope
UNSUBSCRIBE_CHUNK = 100
# Klaviyo's published limits per endpoint: (requests, window seconds), burst then steady.
RATES: Rates = {"import": [(75, 1.0), (750, 60.0)], "bulk": [(10, 1.0), (150, 60.0)], "privacy": [(3, 1.0), (60, 60.0)],
                "default": [(10, 1.0), (150, 60.0)]}
_POINTER = re.compile(r"/profiles/data/(\d+)")


class Klaviyo:
    """The adapter: one Klaviyo account.

    Parameters:
      base_url: API root (``https://a.klaviyo.com`` or the sandbox's).
      api_key: the private key.
      fields: this account's field mapping.
      list_id: a list the bulk jobs add profiles to (optional).
      timeout: seconds per request.
      job_timeout: seconds a bulk job may take before the send is retried.
      guard: the account's shared guard (burst and steady windows per bucket).
      name: the target's name (default ``klaviyo``).
    """

    kind = KIND
    batch_limit = BATCH_LIMIT
    prefers_bulk = False

    def __init__(self, base_url: str, api_key: str, fields: Mapping[str, MappingEntry], *, list_id: str | None = None,
                 timeout: float = 10.0, job_timeout: float = 300.0, guard: EspGuard | None = None, name: str = KIND) -> None:
        self.name = name
        self._fields = normalize(fields)
        self._list = list_id
        self._job_timeout = job_timeout
        headers = {"Authorization": f"Klaviyo-API-Key {api_key}", "revision": REVISION, "Accept": CONTENT_TYPE}
        self.http = EspHttp("klaviyo", base_url, headers, timeout=timeout, guard=guard, describe=_describe, rate=_rate)

    def member(self, profile: Profile) -> dict[str, Any] | None:
        return profile_body(profile, self._fields)

    def key(self, member: dict[str, Any]) -> str:
        return str(member["profile"]["attributes"]["email"]).lower()

    def fields(self, member: dict[str, Any]) -> dict[str, Scalar]:
        return flatten(member["profile"]["attributes"])

    def unsubscribed(self, member: dict[str, Any]) -> bool:
        return bool(member.get("unsubscribe"))

    async def upsert(self, member: dict[str, Any], on_job: OnJob | None = None) -> None:
        """The unsubscribe first: it must reach Klaviyo even when the profile itself is refused."""
        if self.unsubscribed(member):
            await self._unsubscribe([self.key(member)])
        await self._post("/api/profile-import", {"data": member["profile"]}, bucket="import")

    async def upsert_batch(self, members: list[dict[str, Any]], on_job: OnJob | None = None) -> dict[str, str]:
        """Unsubscribes first, then bulk import jobs (split to stay under 5 MB), each polled until complete.

        Raises EspUnavailable(``esp_timeout``) for any failure once a job was accepted: the job may
        still run, so the caller keeps its send lease (nothing may overtake it) until it runs out.
        """
        if len(members) > BATCH_LIMIT:
            raise ValueError(f"at most {BATCH_LIMIT} profiles per job")
        leaving = [self.key(m) for m in members if self.unsubscribed(m)]
        for start in range(0, len(leaving), UNSUBSCRIBE_CHUNK):
            await self._unsubscribe(leaving[start:start + UNSUBSCRIBE_CHUNK])
        refused: dict[str, str] = {}
        for chunk in chunks_by_size([m["profile"] for m in members], MAX_JOB_BYTES):
            refused.update(await self._import_job(chunk, on_job))
        return refused

    async def _import_job(self, profiles: list[dict[str, Any]], on_job: OnJob | None) -> dict[str, str]:
        data: dict[str, Any] = {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": profiles}}}
        if self._list:
            data["relationships"] = {"lists": {"data": [{"type": "list", "id": self._list}]}}
        created = await self._post("/api/profile-bulk-import-jobs", {"data": data}, bucket="bulk")
        job_id = (created or {}).get("data", {}).get("id")
        if not job_id:
            raise EspUnavailable("klaviyo bulk job answer without an id")
        if on_job is not None:
            await on_job(str(job_id))
        job: dict[str, Any] = {}

        async def finished() -> bool:
            _, body = await self.http.request("GET", f"/api/profile-bulk-import-jobs/{job_id}")
            job.update((body or {}).get("data", {}).get("attributes", {}))
            if job.get("status") == "cancelled":
                raise EspUnavailable("klaviyo bulk job cancelled")
            return job.get("status") == "complete"

        try:
            await wait_for_job(finished, self._job_timeout, "klaviyo")
            refused = await self._import_errors(job_id, profiles) if job.get("failed_count") else {}
        except MergetagError as exc:
            raise EspTimeout(f"klaviyo bulk job not confirmed: {exc.code}") from None
        if len(refused) < int(job.get("failed_count") or 0):
            # Never count a refusal we cannot place as a success: the whole job is sent again.
            raise EspUnavailable("klaviyo bulk job reported failures it did not name")
        return refused

    async def _import_errors(self, job_id: str, profiles: list[dict[str, Any]]) -> dict[str, str]:
        """The job's refused items, by email: found by their position, else by the payload they echo."""
        refused: dict[str, str] = {}
        url: str | None = f"/api/profile-bulk-import-jobs/{job_id}/import-errors?page%5Bsize%5D=100"
        while url:
            _, body = await self.http.request("GET", url)
            for error in (body or {}).get("data", []):
                attrs = error.get("attributes", {})
                match = _POINTER.search(str((attrs.get("source") or {}).get("pointer") or ""))
                if match and int(match.group(1)) < len(profiles):
                    email = profiles[int(match.group(1))]["attributes"]["email"]
                else:
                    email = ((attrs.get("original_payload") or {}).get("attributes") or attrs.get("original_payload") or {}).get("email")
                if email:
                    refused[str(email).lower()] = f"klaviyo {attrs.get('code', 'invalid')} {attrs.get('title', '')}".strip()
            url = ((body or {}).get("links") or {}).get("next")
        return refused

    async def _unsubscribe(self, emails: list[str]) -> None:
        profiles = [{"type": "profile", "attributes": {"email": email, "subscriptions": {"email": {"marketing": {"consent": "UNSUBSCRIBED"}}}}}
                    for email in emails]
        await self._post("/api/profile-subscription-bulk-delete-jobs",
                         {"data": {"type": "profile-subscription-bulk-delete-job", "attributes": {"profiles": {"data": profiles}}}})

    async def erase(self, email: str) -> None:
        """A data privacy deletion job: Klaviyo removes the profile and its history."""
        profile = {"data": {"type": "profile", "attributes": {"email": email}}}
        await self._post("/api/data-privacy-deletion-jobs", {"data": {"type": "data-privacy-deletion-job", "attributes": {"profile": profile}}},
                         bucket="privacy")

    async def unsubscribe(self, email: str) -> None:
        await self._unsubscribe([email])

    async def retire(self, email: str) -> None:
        """Klaviyo has no archive and deleting would erase history: the contact is unsubscribed from
        email marketing instead, so it is never left subscribed."""
        await self._unsubscribe([email])

    async def job_done(self, job_id: str) -> bool:
        status, body = await self.http.request("GET", f"/api/profile-bulk-import-jobs/{job_id}", gone_ok=True)
        state = ((body or {}).get("data") or {}).get("attributes", {}).get("status")
        return status == 404 or state in ("complete", "cancelled")

    async def held(self, email: str) -> Held | None:
        query = f"filter={quote(f'equals(email,{json.dumps(email)})')}&additional-fields%5Bprofile%5D=subscriptions"
        _, body = await self.http.request("GET", f"/api/profiles?{query}")
        found = (body or {}).get("data") or []
        if not found:
            return None
        attributes = found[0].get("attributes", {})
        consent = (((attributes.get("subscriptions") or {}).get("email") or {}).get("marketing") or {}).get("consent")
        return Held(flatten(attributes), consent == "UNSUBSCRIBED")

    async def field_problems(self) -> list[str]:
        """Custom properties need no definition; standard attributes are text; the key must work."""
        found = []
        for trait, spec in sorted(normalize(self._fields).items()):
            if spec.tag.startswith("location.") and spec.tag[9:] not in LOCATION:
                found.append(f"{trait}: {spec.tag} is not a Klaviyo location attribute")
            elif spec.tag in STANDARD and spec.type not in (None, "text"):
                found.append(f"{trait}: {spec.tag} is a text attribute, the mapping converts to {spec.type}")
        await self.http.request("GET", "/api/profiles?page%5Bsize%5D=1")
        return found

    async def _post(self, path: str, body: dict[str, Any], bucket: str = "default") -> dict[str, Any] | None:
        _, parsed = await self.http.request("POST", path, body, bucket=bucket, content_type=CONTENT_TYPE)
        return parsed

    async def close(self) -> None:
        await self.http.close()


def _describe(status: int, body: dict[str, Any]) -> str:
    """Klaviyo's error codes and pointers; never its ``detail`` (it may quote the value)."""
    errors = [e for e in body.get("errors", []) if isinstance(e, dict)]
    return ", ".join(f"{e.get('code', '')} {(e.get('source') or {}).get('pointer') or ''}".strip() for e in errors)


def _rate(headers: Mapping[str, str]) -> tuple[int | None, float | None]:
    try:
        remaining = int(headers["RateLimit-Remaining"]) if "RateLimit-Remaining" in headers else None
        reset = float(headers["RateLimit-Reset"]) if "RateLimit-Reset" in headers else None
    except ValueError:
        return None, None
    return remaining, reset
