"""A Mailchimp sandbox: a real HTTP server that enforces the parts of the Mailchimp
Marketing API v3 contract mergetag relies on. State lives in memory.

Enforced: Basic auth with the API key as password; the member path (the MD5 of the
lowercased email, or the email address itself, which Mailchimp takes in its place); member
body validation (status enums, ``status_if_new`` for new members, merge tags
defined on the audience, number and date types); the compliance rule that an
unsubscribed member cannot be resubscribed through the API; problem+json errors, each with
an ``instance`` of its own (unknown routes and methods too); 429 beyond 10 simultaneous
connections per key. ``PATCH`` on a member updates only what it names and never creates one.
Batch operations (``POST /batches``, member ``PUT`` and ``PATCH``): run in the background,
polled with ``GET /batches/{id}``, listed by ``GET /batches`` (``count`` 1..1000, default 10,
and ``offset``; in submission order), results as a gzipped tar of JSON behind a keyless
download URL.

Sandbox-only controls live under ``/_sandbox`` (fault injection, statistics).

Run: ``python -m sandboxes.mailchimp --port 8081``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import re
import tarfile
import time
import uuid
from datetime import date
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from sandboxes.kit import SandboxBase, json_body, serve

STATUSES = {"subscribed", "unsubscribed", "cleaned", "pending", "transactional"}
TAG = re.compile(r"^[A-Z0-9_]{1,10}$")
MAX_MERGE_FIELDS = 30
MAX_CONNECTIONS = 10
DEFAULT_FIELDS = {"FNAME": "text", "LNAME": "text", "LTV": "number", "ORDERS": "number", "LASTORDER": "date", "TIER": "text"}
MAX_COUNT, DEFAULT_COUNT = 1000, 10
MEMBER_PATH = re.compile(r"/?lists/([^/]+)/members/([^/]+)")
NOT_FOUND = ("Resource Not Found", "The requested resource could not be found.")


def problem_body(status: int, title: str, detail: str, errors: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """A problem document; ``instance`` names this one occurrence, as Mailchimp's support asks for it."""
    body: dict[str, Any] = {
        "type": "https://mailchimp.com/developer/marketing/docs/errors/",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": str(uuid.uuid4()),
    }
    if errors:
        body["errors"] = errors
    return body


def problem(status: int, title: str, detail: str, errors: list[dict[str, str]] | None = None) -> web.Response:
    return web.json_response(problem_body(status, title, detail, errors), status=status, content_type="application/problem+json")


class Sandbox(SandboxBase):
    """The in-memory audience(s) and the contract checks.

    Parameters:
      api_key: the only key accepted.
      lists: list id -> {merge tag: type}.
    """

    def __init__(self, api_key: str, lists: dict[str, dict[str, str]], batch_delay_s: float = 0.3) -> None:
        super().__init__()
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_results: dict[str, bytes] = {}
        self.batch_delay_s = batch_delay_s
        self.api_key = api_key
        self.merge_fields = {list_id: dict(fields) for list_id, fields in lists.items()}
        self.members: dict[str, dict[str, dict[str, Any]]] = {list_id: {} for list_id in lists}
        self.forgotten: set[str] = set()

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/3.0/ping", self.ping)
        app.router.add_get("/3.0/lists/{list_id}/merge-fields", self.list_merge_fields)
        app.router.add_post("/3.0/lists/{list_id}/merge-fields", self.add_merge_field)
        app.router.add_get("/3.0/lists/{list_id}/members", self.list_members)
        app.router.add_post("/3.0/lists/{list_id}", self.batch_members)
        app.router.add_get("/3.0/lists/{list_id}/members/{hash}", self.get_member)
        app.router.add_put("/3.0/lists/{list_id}/members/{hash}", self.put_member)
        app.router.add_patch("/3.0/lists/{list_id}/members/{hash}", self.patch_member)
        app.router.add_delete("/3.0/lists/{list_id}/members/{hash}", self.archive_member)
        app.router.add_post("/3.0/lists/{list_id}/members/{hash}/actions/delete-permanent", self.delete_permanent)
        app.router.add_post("/3.0/batches", self.create_batch)
        app.router.add_get("/3.0/batches", self.list_batches)
        app.router.add_get("/3.0/batches/{batch_id}", self.get_batch)
        app.router.add_get("/_sandbox/files/batches/{batch_id}.tar.gz", self.batch_file)

    def error(self, status: int, title: str, detail: str) -> web.Response:
        return problem(status, title, detail)

    async def admit(self, request: web.Request) -> web.StreamResponse | None:
        if not self._authorized(request.headers.get("Authorization", "")):
            return problem(401, "API Key Invalid", "Your API key may be invalid, or you've attempted to access the wrong datacenter.")
        if self.in_flight >= MAX_CONNECTIONS:
            return problem(429, "Too Many Requests", "You have exceeded the limit of 10 simultaneous connections.")
        missing = request.match_info.http_exception
        if missing is not None:
            if missing.status == 405:
                return problem(405, "Method Not Allowed", "The requested method and resource are not compatible.")
            return problem(404, *NOT_FOUND)
        return None

    def _authorized(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            _, _, password = base64.b64decode(value).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return password == self.api_key

    def _list(self, request: web.Request) -> str:
        list_id = request.match_info["list_id"]
        if list_id not in self.members:
            raise web.HTTPNotFound(text=json.dumps(problem_body(404, *NOT_FOUND)), content_type="application/problem+json")
        return list_id

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response({"health_status": "Everything's Chimpy!"})

    async def list_merge_fields(self, request: web.Request) -> web.Response:
        list_id = self._list(request)
        fields = [{"tag": tag, "name": tag, "type": kind, "list_id": list_id} for tag, kind in self.merge_fields[list_id].items()]
        return web.json_response({"merge_fields": fields, "list_id": list_id, "total_items": len(fields)})

    async def add_merge_field(self, request: web.Request) -> web.Response:
        list_id = self._list(request)
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return problem(400, "Invalid Resource", "The resource submitted could not be validated.", [{"field": "name", "message": "This value should not be blank."}])
        tag = str(body.get("tag") or body["name"]).upper()
        kind = body.get("type", "text")
        if not TAG.match(tag) or kind not in {"text", "number", "date"}:
            return problem(400, "Invalid Resource", "The resource submitted could not be validated.", [{"field": "tag", "message": "Invalid merge tag."}])
        fields = self.merge_fields[list_id]
        if tag in fields:
            return problem(400, "Invalid Resource", f"A Merge Field with the tag \"{tag}\" already exists for this list.")
        if len(fields) >= MAX_MERGE_FIELDS:
            return problem(400, "Invalid Resource", "This list has reached its maximum number of merge fields.")
        fields[tag] = kind
        return web.json_response({"tag": tag, "name": body["name"], "type": kind, "list_id": list_id})

    async def list_members(self, request: web.Request) -> web.Response:
        list_id = self._list(request)
        members = list(self.members[list_id].values())
        return web.json_response({"members": members, "list_id": list_id, "total_items": len(members)})

    async def get_member(self, request: web.Request) -> web.Response:
        list_id = self._list(request)
        member = self.members[list_id].get(_hash(request.match_info["hash"]))
        if member is None:
            return problem(404, *NOT_FOUND)
        return web.json_response(member)

    async def batch_members(self, request: web.Request) -> web.Response:
        """Batch subscribe/update: up to 500 members, 200 even when some fail (per-member ``errors``)."""
        list_id = self._list(request)
        body = await json_body(request)
        members = body.get("members") if isinstance(body, dict) else None
        if not isinstance(members, list) or not members:
            return problem(400, "Invalid Resource", "The resource submitted could not be validated.", [{"field": "members", "message": "Required."}])
        if len(members) > 500:
            return problem(400, "Invalid Resource", "You may only submit 500 members at a time.")
        created, updated, errors = [], [], []
        for item in members:
            if not isinstance(item, dict):
                errors.append({"email_address": "", "error": "Invalid member", "error_code": "ERROR_GENERIC"})
                continue
            problems = self._validate_member(list_id, item)
            if problems:
                errors.append({"email_address": str(item.get("email_address", "")), "error": problems[0]["message"],
                               "error_code": "ERROR_GENERIC", "field": problems[0]["field"], "field_message": problems[0]["message"]})
                continue
            existed = hashlib.md5(item["email_address"].lower().encode()).hexdigest() in self.members[list_id]
            if existed and not body.get("update_existing"):
                errors.append({"email_address": item["email_address"], "error": "Member Exists", "error_code": "ERROR_CONTACT_EXISTS"})
                continue
            member, failure = self._upsert(list_id, item)
            if failure:
                errors.append({"email_address": item["email_address"], "error": failure, "error_code": "ERROR_GENERIC"})
            else:
                (updated if existed else created).append(member)
        return web.json_response({"new_members": created, "updated_members": updated, "errors": errors,
                                  "total_created": len(created), "total_updated": len(updated), "error_count": len(errors)})

    def _upsert(self, list_id: str, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """Create or update one valid member; returns it, or the reason it was refused."""
        email = body["email_address"]
        member_hash = hashlib.md5(email.lower().encode()).hexdigest()
        members = self.members[list_id]
        existing = members.get(member_hash)
        if existing is None and member_hash in self.forgotten:
            # As Mailchimp: a permanently deleted contact cannot be re-added through the API.
            return None, "Forgotten Email Not Subscribed"
        if existing is None:
            status = body.get("status") or body.get("status_if_new")
            if status is None:
                return None, "status_if_new is required for new members."
            member = {"id": member_hash, "email_address": email, "status": status, "merge_fields": {}, "list_id": list_id, "update_count": 0}
        else:
            member = dict(existing)
            new_status = body.get("status")
            if new_status == "subscribed" and existing["status"] in {"unsubscribed", "cleaned"}:
                return None, "Member In Compliance State"
            if new_status:
                member["status"] = new_status
        member["merge_fields"] = {**member["merge_fields"], **body.get("merge_fields", {})}
        member["update_count"] += 1
        members[member_hash] = member
        self.record_write(email, member["merge_fields"])
        return member, None

    async def put_member(self, request: web.Request) -> web.Response:
        list_id = self._list(request)
        status, body = self._put(list_id, _hash(request.match_info["hash"]), await json_body(request))
        if status >= 400:
            return web.json_response(body, status=status, content_type="application/problem+json")
        return web.json_response(body)

    async def patch_member(self, request: web.Request) -> web.Response:
        list_id = self._list(request)
        status, body = self._patch(list_id, _hash(request.match_info["hash"]), await json_body(request))
        if status >= 400:
            return web.json_response(body, status=status, content_type="application/problem+json")
        return web.json_response(body)

    def _patch(self, list_id: str, member_hash: str, body: Any) -> tuple[int, dict[str, Any]]:
        """``PATCH .../members/{hash}``: changes only what the body names, on a member Mailchimp holds
        (archived ones too); never creates one. A new ``email_address`` moves the member to its hash."""
        members = self.members[list_id]
        member = members.get(member_hash)
        if member is None:
            return 404, problem_body(404, *NOT_FOUND)
        if not isinstance(body, dict):
            return 400, problem_body(400, "Invalid Resource", "The resource submitted could not be validated.")
        errors = self._validate_member(list_id, {"email_address": member["email_address"], **body})
        if errors:
            return 400, problem_body(400, "Invalid Resource", "The resource submitted could not be validated.", errors)
        if body.get("status") == "subscribed" and member["status"] in {"unsubscribed", "cleaned"}:
            return 400, problem_body(400, "Member In Compliance State", "The member is in a compliance state and cannot be subscribed.")
        email = body.get("email_address", member["email_address"])
        new_hash = hashlib.md5(email.lower().encode()).hexdigest()
        if new_hash != member_hash and new_hash in members:
            return 400, problem_body(400, "Member Exists", "The new email address is already a list member.")
        if new_hash != member_hash and new_hash in self.forgotten:
            return 400, problem_body(400, "Forgotten Email Not Subscribed", "The new email address was permanently deleted and cannot be re-added.")
        updated = {**member, "email_address": email, "id": new_hash, "update_count": member["update_count"] + 1,
                   "merge_fields": {**member["merge_fields"], **body.get("merge_fields", {})}}
        if body.get("status"):
            updated["status"] = body["status"]
        if new_hash != member_hash:
            members.pop(member_hash)
        members[new_hash] = updated
        self.record_write(email, updated["merge_fields"])
        return 200, updated

    def _put(self, list_id: str, member_hash_in_path: str, body: Any) -> tuple[int, dict[str, Any]]:
        """One member upsert, as ``PUT .../members/{hash}`` answers it (for the route and for batch operations)."""
        def fail(title: str, detail: str, errors: list[dict[str, str]] | None = None) -> tuple[int, dict[str, Any]]:
            return 400, problem_body(400, title, detail, errors)

        if not isinstance(body, dict):
            return fail("Invalid Resource", "The resource submitted could not be validated.")
        errors = self._validate_member(list_id, body)
        if errors:
            return fail("Invalid Resource", "The resource submitted could not be validated.", errors)
        email = body["email_address"]
        member_hash = hashlib.md5(email.lower().encode()).hexdigest()
        if member_hash_in_path.lower() != member_hash:
            return fail("Invalid Resource", "The subscriber hash does not match the email address.", [{"field": "email_address", "message": "hash mismatch"}])
        member, failure = self._upsert(list_id, body)
        if failure == "Member In Compliance State":
            return fail(failure, f"{email} is in a compliance state due to unsubscribe, bounce, or compliance review and cannot be subscribed.")
        if failure:
            return fail("Invalid Resource", "The resource submitted could not be validated.", [{"field": "status_if_new", "message": failure}])
        return 200, member

    async def create_batch(self, request: web.Request) -> web.Response:
        """``POST /batches``: operations run later, in the background, as Mailchimp does."""
        body = await json_body(request)
        operations = body.get("operations") if isinstance(body, dict) else None
        if not isinstance(operations, list) or not operations:
            return problem(400, "Invalid Resource", "The resource submitted could not be validated.", [{"field": "operations", "message": "Required."}])
        for op in operations:
            if not isinstance(op, dict) or op.get("method") not in {"GET", "POST", "PUT", "PATCH", "DELETE"} or not isinstance(op.get("path"), str):
                return problem(400, "Invalid Resource", "The resource submitted could not be validated.", [{"field": "operations", "message": "Each operation needs a method and a path."}])
            if "body" in op and not isinstance(op["body"], str):
                return problem(400, "Invalid Resource", "The resource submitted could not be validated.", [{"field": "operations.body", "message": "The body must be a JSON string."}])
        batch_id = uuid.uuid4().hex[:10]
        self.batches[batch_id] = {"id": batch_id, "status": "pending", "total_operations": len(operations), "finished_operations": 0,
                                  "errored_operations": 0, "submitted_at": _now(), "completed_at": "", "response_body_url": ""}
        asyncio.get_running_loop().create_task(self._run_batch(batch_id, operations, f"{request.scheme}://{request.host}"))
        return web.json_response(self.batches[batch_id])

    async def _run_batch(self, batch_id: str, operations: list[dict[str, Any]], base: str) -> None:
        await asyncio.sleep(self.batch_delay_s)
        batch = self.batches[batch_id]
        batch["status"] = "started"
        results = []
        for op in operations:
            match = MEMBER_PATH.fullmatch(op["path"])
            if op["method"] not in {"PUT", "PATCH"} or match is None or match.group(1) not in self.members:
                status, body = 404, problem_body(404, *NOT_FOUND)
            else:
                try:
                    parsed = json.loads(op.get("body") or "null")
                except ValueError:
                    parsed = None
                run = self._put if op["method"] == "PUT" else self._patch
                status, body = run(match.group(1), _hash(unquote(match.group(2))), parsed)
            results.append({"status_code": status, "operation_id": op.get("operation_id"), "response": json.dumps(body)})
            batch["finished_operations"] += 1
            batch["errored_operations"] += status >= 400
        await asyncio.sleep(self.batch_delay_s)
        self.batch_results[batch_id] = _tarball(results)
        batch.update(status="finished", completed_at=_now(), response_body_url=f"{base}/_sandbox/files/batches/{batch_id}.tar.gz")

    async def list_batches(self, request: web.Request) -> web.Response:
        """``GET /batches``: a page of the batch requests made, and how many there are in all."""
        count = _integer(request.query.get("count", str(DEFAULT_COUNT)))
        offset = _integer(request.query.get("offset", "0"))
        if count is None or not 1 <= count <= MAX_COUNT:
            return problem(400, "Invalid Resource", "The resource submitted could not be validated.",
                           [{"field": "count", "message": f"count must be an integer from 1 to {MAX_COUNT}."}])
        if offset is None or offset < 0:
            return problem(400, "Invalid Resource", "The resource submitted could not be validated.",
                           [{"field": "offset", "message": "offset must be an integer, 0 or more."}])
        batches = list(self.batches.values())
        return web.json_response({"batches": batches[offset:offset + count], "total_items": len(batches)})

    async def get_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return problem(404, *NOT_FOUND)
        return web.json_response(batch)

    async def batch_file(self, request: web.Request) -> web.Response:
        """The results of a finished batch: a gzipped tar of JSON files, behind a pre-signed URL (no API key)."""
        if "Authorization" in request.headers:
            return web.Response(status=400, text="Only one auth mechanism allowed")
        data = self.batch_results.get(request.match_info["batch_id"])
        if data is None:
            return web.Response(status=404, text="NoSuchKey")
        return web.Response(body=data, content_type="application/x-gzip")

    def _validate_member(self, list_id: str, body: dict[str, Any]) -> list[dict[str, str]]:
        errors = []
        email = body.get("email_address")
        if not isinstance(email, str) or not re.match(r"^[^@\s]+@[^@\s]+\.[^@\s]+$", email):
            errors.append({"field": "email_address", "message": "This value should be a valid email."})
        for key in ("status", "status_if_new"):
            if key in body and body[key] not in STATUSES:
                errors.append({"field": key, "message": "Invalid status."})
        merge_fields = body.get("merge_fields", {})
        if not isinstance(merge_fields, dict):
            return [*errors, {"field": "merge_fields", "message": "Schema describes object."}]
        defined = self.merge_fields[list_id]
        for tag, value in merge_fields.items():
            kind = defined.get(tag)
            if kind is None:
                errors.append({"field": f"merge_fields.{tag}", "message": "Merge field is not defined on this audience."})
            elif not _valid_value(kind, value):
                errors.append({"field": f"merge_fields.{tag}", "message": f"Invalid value for a {kind} field."})
        return errors

    async def delete_permanent(self, request: web.Request) -> web.Response:
        list_id = self._list(request)
        member_hash = _hash(request.match_info["hash"])
        if self.members[list_id].pop(member_hash, None) is None:
            return problem(404, *NOT_FOUND)
        self.forgotten.add(member_hash)
        return web.Response(status=204)

    async def archive_member(self, request: web.Request) -> web.Response:
        list_id = self._list(request)
        member = self.members[list_id].get(_hash(request.match_info["hash"]))
        if member is None:
            return problem(404, *NOT_FOUND)
        member["status"] = "archived"
        return web.Response(status=204)


def _hash(given: str) -> str:
    """The subscriber hash from the path: Mailchimp takes the email address in its place too."""
    return hashlib.md5(given.lower().encode()).hexdigest() if "@" in given else given.lower()


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def _tarball(results: list[dict[str, Any]]) -> bytes:
    """Batch results as Mailchimp ships them: JSON files (arrays of results) in a gzipped tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = json.dumps(results).encode()
        info = tarfile.TarInfo("results/0.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _valid_value(kind: str, value: Any) -> bool:
    if value == "":
        return True
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "date":
        try:
            date.fromisoformat(value)
        except (TypeError, ValueError):
            return False
        return True
    return isinstance(value, str) and len(value) <= 255


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--api-key", default="sandbox0000000000000000000000000-us1")
    parser.add_argument("--list-id", default="sandbox")
    parser.add_argument("--batch-delay-ms", type=int, default=300, help="how long batch operations wait before and after running")
    parser.add_argument("--merge-fields", default=",".join(f"{t}:{k}" for t, k in DEFAULT_FIELDS.items()),
                        help="TAG:type,... defined on the audience at start")
    args = parser.parse_args(argv)
    fields = dict(item.split(":", 1) for item in args.merge_fields.split(",") if item)
    sandbox = Sandbox(args.api_key, {args.list_id: fields}, args.batch_delay_ms / 1000)
    serve(sandbox, "mailchimp", args.host, args.port)


if __name__ == "__main__":
    main()
