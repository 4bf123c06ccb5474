"""Mailchimp Marketing API v3: one member upsert per profile, batch operations for backlogs.

``PUT /lists/{list}/members/{md5(lower(email))}`` with ``status_if_new`` only,
so an existing member's consent is never overwritten; the one exception is an
unsubscribe, which is pushed as ``status: unsubscribed`` (consent wins).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Mapping
from typing import Any

import aiohttp

from adapters.esps.base import Held, OnJob
from adapters.esps.fields import MappingEntry, normalize, problems
from adapters.esps.guard import EspGuard
from adapters.esps.http import EspHttp, download, wait_for_job
from adapters.esps.mailchimp.member import member_body, subscriber_hash
from schemas.errors import EspTimeout, EspUnavailable, MergetagError
from schemas.events import Scalar
from schemas.profile import Profile

KIND = "mailchimp"
ACCOUNT_ERRORS = frozenset({401, 403, 404})
BATCH_LIMIT = 500
TAG = re.compile(r"^[A-Z0-9_]{1,10}$")


class Mailchimp:
    """The adapter: one audience of one account.

    Parameters:
      base_url: API root ending in ``/3.0`` (the sandbox's, or the data centre's).
      api_key: sent as the Basic-auth password.
      list_id: the audience.
      merge_fields: this audience's field mapping.
      timeout: seconds per request.
      guard: the account's shared guard (10 simultaneous connections per key).
      name: the target's name (default ``mailchimp``).
      job_timeout: seconds a batch may take before the send is retried.
    """

    kind = KIND
    batch_limit = BATCH_LIMIT
    prefers_bulk = False

    def __init__(self, base_url: str, api_key: str, list_id: str, merge_fields: Mapping[str, MappingEntry], *,
                 timeout: float = 10.0, guard: EspGuard | None = None, name: str = KIND, job_timeout: float = 300.0) -> None:
        self.name = name
        self._job_timeout = job_timeout
        self._list = list_id
        self._fields = normalize(merge_fields)
        self.http = EspHttp("mailchimp", base_url, {"Authorization": aiohttp.encode_basic_auth("mergetag", api_key)},
                            timeout=timeout, guard=guard, describe=_describe)

    def member(self, profile: Profile) -> dict[str, Any] | None:
        return member_body(profile, self._fields)

    def key(self, member: dict[str, Any]) -> str:
        return str(member["email_address"]).lower()

    def fields(self, member: dict[str, Any]) -> dict[str, Scalar]:
        return dict(member.get("merge_fields", {}))

    def unsubscribed(self, member: dict[str, Any]) -> bool:
        return member.get("status") == "unsubscribed"

    async def upsert(self, member: dict[str, Any], on_job: OnJob | None = None) -> None:
        await self._call("PUT", f"/lists/{self._list}/members/{subscriber_hash(member['email_address'])}", member)

    async def upsert_batch(self, members: list[dict[str, Any]], on_job: OnJob | None = None) -> dict[str, str]:
        """Batch operations (``POST /batches``): the same consent-safe PUT as a single upsert
        (``status_if_new``), one operation per member, polled until finished; the results file
        names each refused operation. (The list batch endpoint would need ``status`` for every
        member and would overwrite existing members' consent, so it is not used.)

        Raises EspUnavailable(``esp_timeout``) for any failure once the batch was accepted: it may
        still run, so the caller keeps its send lease until it runs out.
        """
        if len(members) > BATCH_LIMIT:
            raise ValueError(f"at most {BATCH_LIMIT} members per batch")
        operations = [{"method": "PUT", "path": f"/lists/{self._list}/members/{subscriber_hash(m['email_address'])}",
                       "operation_id": str(i), "body": json.dumps(m)} for i, m in enumerate(members)]
        created = await self._call("POST", "/batches", {"operations": operations})
        batch_id = (created or {}).get("id")
        if not batch_id:
            raise EspUnavailable("mailchimp batch answer without an id")
        if on_job is not None:
            await on_job(str(batch_id))
        batch: dict[str, Any] = {}

        async def finished() -> bool:
            batch.update(await self._call("GET", f"/batches/{batch_id}") or {})
            return batch.get("status") == "finished"

        try:
            await wait_for_job(finished, self._job_timeout, "mailchimp")
            errored = int(batch.get("errored_operations") or 0)
            refused = await self._batch_errors(str(batch.get("response_body_url") or ""), members) if errored else {}
        except MergetagError as exc:
            raise EspTimeout(f"mailchimp batch not confirmed: {exc.code}") from None
        if len(refused) < errored:
            raise EspUnavailable("mailchimp batch reported errors it did not name")
        return refused

    async def _batch_errors(self, url: str, members: list[dict[str, Any]]) -> dict[str, str]:
        """Refused operations from the results file (a gzipped tar of JSON behind a keyless URL)."""
        data = await download(url, "mailchimp", self._job_timeout)
        refused: dict[str, str] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for entry in tar.getmembers():
                handle = tar.extractfile(entry) if entry.isfile() else None
                for result in (json.loads(handle.read()) if handle else []):
                    index = str(result.get("operation_id", ""))
                    if int(result.get("status_code", 200)) >= 400 and index.isdigit() and int(index) < len(members):
                        try:
                            problem = json.loads(result.get("response") or "{}")
                        except ValueError:
                            problem = {}
                        refused[self.key(members[int(index)])] = f"mailchimp {result['status_code']} {_describe(0, problem)}".strip()
        return refused

    async def field_types(self) -> dict[str, str]:
        """The audience's merge fields: tag -> type."""
        body = await self._call("GET", f"/lists/{self._list}/merge-fields?count=1000")
        return {f["tag"]: f.get("type", "text") for f in (body or {}).get("merge_fields", []) if isinstance(f, dict)}

    async def field_problems(self) -> list[str]:
        mapping = normalize(self._fields)
        bad = [f"{trait}: {spec.tag} is not a merge tag (A-Z, 0-9, _; at most 10)" for trait, spec in sorted(mapping.items())
               if not TAG.match(spec.tag)]
        return bad + problems(mapping, await self.field_types())

    async def get_member(self, email: str) -> dict[str, Any] | None:
        """The member as Mailchimp holds it (None when unknown)."""
        return await self._call("GET", f"/lists/{self._list}/members/{subscriber_hash(email)}", gone_ok=True)

    async def held(self, email: str) -> Held | None:
        member = await self.get_member(email)
        if member is None:
            return None
        return Held(dict(member.get("merge_fields", {})), member.get("status") in ("unsubscribed", "cleaned", "archived"))

    async def erase(self, email: str) -> None:
        """Erase a member for good (a privacy request); an unknown member is already gone."""
        await self._call("POST", f"/lists/{self._list}/members/{subscriber_hash(email)}/actions/delete-permanent", gone_ok=True)

    async def unsubscribe(self, email: str) -> None:
        """``PATCH`` the member to unsubscribed: an address Mailchimp does not hold is not created."""
        await self._call("PATCH", f"/lists/{self._list}/members/{subscriber_hash(email)}", {"status": "unsubscribed"}, gone_ok=True)

    async def retire(self, email: str) -> None:
        """Archive a member: kept by Mailchimp, no longer mailed."""
        await self._call("DELETE", f"/lists/{self._list}/members/{subscriber_hash(email)}", gone_ok=True)

    async def job_done(self, job_id: str) -> bool:
        """A batch is done once finished (or unknown to Mailchimp: batch records expire)."""
        batch = await self._call("GET", f"/batches/{job_id}", gone_ok=True)
        return batch is None or batch.get("status") == "finished"

    async def _call(self, method: str, path: str, body: Any = None, gone_ok: bool = False) -> dict[str, Any] | None:
        _, parsed = await self.http.request(method, path, body, gone_ok=gone_ok, account_errors=ACCOUNT_ERRORS)
        return parsed

    async def close(self) -> None:
        await self.http.close()


def _describe(status: int, problem: dict[str, Any]) -> str:
    """Mailchimp's problem+json title and field names; never its ``detail`` (it may name the member)."""
    detail = str(problem.get("title", ""))
    fields = [e.get("field") for e in problem.get("errors", []) if isinstance(e, dict) and e.get("field")]
    if fields:
        detail += f" (fields: {', '.join(map(str, fields))})"
    return detail
