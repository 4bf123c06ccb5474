"""The SendGrid sandbox enforces the Marketing Contacts contract the adapter depends on (its own process)."""

import csv
import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from sandboxes.local import free_port, wait_for_port
from tests.conftest import ROOT, eventually, stop

KEY = "SG.test.0123456789abcdefghijkl"
AUTH = {"Authorization": f"Bearer {KEY}"}
LTV, ORDERS, LAST_ORDER, TIER = "e1_N", "e2_N", "e3_D", "e4_T"


@dataclass
class SG:
    url: str

    async def call(self, http, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, data: bytes | None = None):
        async with http.request(method, self.url + path, json=body if data is None else None, data=data,
                                headers=AUTH if headers is None else headers) as r:
            raw = await r.read()
            return r.status, dict(r.headers), json.loads(raw) if raw else None

    async def control(self, http, path: str, body: dict[str, Any] | None = None) -> Any:
        async with http.request("POST" if body is not None else "GET", f"{self.url}/_sandbox/{path}", json=body) as r:
            return await r.json()

    async def job(self, http, job_id: str) -> dict[str, Any]:
        status, _, job = await self.call(http, "GET", f"/v3/marketing/contacts/imports/{job_id}")
        assert status == 200
        return job

    async def finished(self, http, job_id: str) -> dict[str, Any]:
        async def done():
            job = await self.job(http, job_id)
            return job if job["status"] != "pending" else None
        return await eventually(done, timeout=10, interval=0.05)

    async def upsert(self, http, contacts: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        status, _, body = await self.call(http, "PUT", "/v3/marketing/contacts", {"contacts": contacts, **extra})
        assert status == 202, body
        return await self.finished(http, body["job_id"])

    async def stored(self, http, email: str) -> dict[str, Any] | None:
        listing = await self.control(http, "contacts")
        return next((c for c in listing["contacts"] if c["email"] == email), None)


def start(*flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sandboxes.sendgrid", "--port", str(port), "--api-key", KEY, *flags],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process=process)
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def sg() -> Iterator[SG]:
    process, url = start("--job-delay-ms", "400", "--list-ids", "sandbox-list,vip")
    yield SG(url)
    stop([process])


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}@example.com"


async def test_auth_is_a_bearer_key_and_refusals_use_sendgrid_errors(sg, http):
    expected = {"errors": [{"field": None, "message": "authorization required"}]}
    for headers in ({}, {"Authorization": "Bearer SG.wrong"}, {"Authorization": f"Basic {KEY}"}):
        status, _, body = await sg.call(http, "GET", "/v3/marketing/field_definitions", headers=headers)
        assert (status, body) == (401, expected)
    status, headers, _ = await sg.call(http, "GET", "/v3/marketing/field_definitions")
    assert status == 200 and headers["X-RateLimit-Limit"] == "600"


async def test_mixed_put_is_a_job_that_errors_only_the_bad_contacts(sg, http):
    alice, bob, carol, dave = f"Alice.{uuid.uuid4().hex[:8]}@Example.COM", unique("bob"), unique("carol"), unique("dave")
    contacts = [
        {"email": alice, "first_name": "Alice", "custom_fields": {LTV: 12.5, TIER: "gold"}},
        {"email": "not-an-email", "first_name": "Nobody"},
        {"email": bob, "custom_fields": {LAST_ORDER: "2024-02-01"}},
        {"email": carol, "custom_fields": {LTV: "lots"}},
        {"email": dave, "custom_fields": {LAST_ORDER: "1st of May"}},
    ]
    status, headers, body = await sg.call(http, "PUT", "/v3/marketing/contacts", {"list_ids": ["vip"], "contacts": contacts})
    assert status == 202 and set(body) == {"job_id"}
    assert int(headers["X-RateLimit-Remaining"]) < int(headers["X-RateLimit-Limit"])
    early = await sg.stored(http, alice.lower())
    pending = await sg.job(http, body["job_id"])
    assert pending["job_type"] == "upsert"
    # While the job is pending nothing of it is applied (a slow machine may only look once it ran).
    if pending["status"] == "pending":
        assert "finished_at" not in pending
    assert early is None or pending["status"] != "pending", "the job must not be applied before its delay"

    job = await sg.finished(http, body["job_id"])
    assert job["status"] == "errored" and job["id"] == body["job_id"] and job["finished_at"]
    results = job["results"]
    assert {k: results[k] for k in ("requested_count", "created_count", "updated_count", "deleted_count", "errored_count")} == {
        "requested_count": 5, "created_count": 2, "updated_count": 0, "deleted_count": 0, "errored_count": 3}
    assert results["errors_url"] == f"{sg.url}/_sandbox/files/imports/{job['id']}/errors.csv"

    # A file download behind a pre-signed URL: no API key (one sent is refused), CSV rows of email and error.
    async with http.get(results["errors_url"]) as r:
        assert r.status == 200 and r.content_type == "text/csv"
        rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert [row["email"] for row in rows] == ["not-an-email", carol, dave]
    assert not any(carol in row["error"] or dave in row["error"] for row in rows)
    assert "e1_N" in rows[1]["error"] and "Number" in rows[1]["error"]
    async with http.get(results["errors_url"], headers=AUTH) as r:
        assert r.status == 400

    stored = await sg.stored(http, alice.lower())
    assert stored["first_name"] == "Alice" and stored["custom_fields"] == {"ltv": 12.5, "tier": "gold"}
    assert stored["list_ids"] == ["vip"] and stored["suppressed"] is False
    assert await sg.stored(http, carol) is None

    job = await sg.upsert(http, [{"email": alice, "custom_fields": {ORDERS: 3, TIER: "platinum"}}])
    assert job["status"] == "completed" and job["results"]["updated_count"] == 1 and job["results"]["errored_count"] == 0
    stored = await sg.stored(http, alice.lower())
    assert stored["first_name"] == "Alice", "an omitted field keeps its value"
    assert stored["custom_fields"] == {"ltv": 12.5, "orders": 3, "tier": "platinum"}
    history = await sg.control(http, "history")
    assert [fields for _, email, fields in history if email == alice.lower()][-1] == {
        "first_name": "Alice", "ltv": 12.5, "orders": 3, "tier": "platinum"}


async def test_a_job_where_every_contact_errors_fails(sg, http):
    job = await sg.upsert(http, [{"email": "nope"}, {"email": unique("x"), "custom_fields": {ORDERS: True}}])
    assert job["status"] == "failed" and job["results"]["errored_count"] == 2 and job["results"]["created_count"] == 0


async def test_request_level_problems_fail_the_whole_put_with_a_field_pointer(sg, http):
    good = {"email": unique("ok")}
    cases = [
        ({"contacts": [good, {"email": unique("a"), "custom_fields": {"e9_T": "x"}}]}, "contacts[1].custom_fields.e9_T"),
        ({"contacts": [{"email": unique("b"), "custom_fields": {"ltv": 1}}]}, "contacts[0].custom_fields.ltv"),
        ({"contacts": [{"first_name": "no identifier"}]}, "contacts[0]"),
        ({"contacts": [{"email": unique("c"), "first_name": 7}]}, "contacts[0].first_name"),
        ({"contacts": [{"email": unique("d"), "ltv": 1}]}, "contacts[0].ltv"),
        ({"contacts": good}, "contacts"),
        ({"contacts": [good], "list_ids": "vip"}, "list_ids"),
        ({"contacts": []}, "contacts"),
    ]
    for body, field in cases:
        status, _, answer = await sg.call(http, "PUT", "/v3/marketing/contacts", body)
        assert status == 400, body
        assert field in [e["field"] for e in answer["errors"]], answer
        assert not any("@" in e["message"] for e in answer["errors"])
    assert await sg.stored(http, good["email"]) is None


async def test_more_than_30000_contacts_is_400_and_more_than_6mb_is_413(sg, http):
    many = [{"email": f"u{i}@example.com"} for i in range(30_001)]
    status, _, body = await sg.call(http, "PUT", "/v3/marketing/contacts", {"contacts": many})
    assert status == 400 and body["errors"][0]["field"] == "contacts" and "30000" in body["errors"][0]["message"]

    huge = json.dumps({"contacts": [{"email": f"big{i}@example.com", "address_line_2": "x" * 300} for i in range(20_000)]}).encode()
    assert len(huge) > 6_000_000
    status, _, body = await sg.call(http, "PUT", "/v3/marketing/contacts", data=huge, headers={**AUTH, "Content-Type": "application/json"})
    assert status == 413 and body["errors"][0]["field"] is None


async def test_unknown_list_id_is_404(sg, http):
    status, _, body = await sg.call(http, "PUT", "/v3/marketing/contacts", {"list_ids": ["no-such-list"], "contacts": [{"email": unique("l")}]})
    assert status == 404 and body["errors"] == [{"field": "list_ids[0]", "message": "list not found"}]


async def test_search_by_emails_found_partial_and_none(sg, http):
    email = unique("search")
    await sg.upsert(http, [{"email": email, "last_name": "Searched", "custom_fields": {ORDERS: 2}}], list_ids=["sandbox-list"])
    missing = unique("missing")
    status, _, body = await sg.call(http, "POST", "/v3/marketing/contacts/search/emails", {"emails": [email.upper(), missing]})
    assert status == 200
    contact = body["result"][email]["contact"]
    assert contact["email"] == email and contact["last_name"] == "Searched" and contact["first_name"] == ""
    assert contact["custom_fields"] == {"orders": 2} and contact["list_ids"] == ["sandbox-list"] and contact["segment_ids"] == []
    assert contact["id"] and contact["created_at"].endswith("Z") and contact["_metadata"]["self"].endswith(contact["id"])
    assert body["result"][missing] == {"error": "contact not found"}

    status, _, by_id = await sg.call(http, "GET", f"/v3/marketing/contacts/{contact['id']}")
    assert status == 200 and by_id == contact

    status, _, body = await sg.call(http, "POST", "/v3/marketing/contacts/search/emails", {"emails": [missing]})
    assert status == 404 and body["errors"][0]["message"] == "no contacts found"
    status, _, body = await sg.call(http, "POST", "/v3/marketing/contacts/search/emails", {"emails": ["bad address"]})
    assert status == 400 and body["errors"][0]["field"] == "emails[0]"


async def test_delete_by_ids_is_a_job_that_removes_the_contacts(sg, http):
    keep, gone = unique("keep"), unique("gone")
    await sg.upsert(http, [{"email": keep}, {"email": gone}])
    gone_id = (await sg.stored(http, gone))["id"]
    status, _, body = await sg.call(http, "DELETE", f"/v3/marketing/contacts?ids={gone_id}")
    assert status == 202 and isinstance(body["job_id"], str)
    job = await sg.finished(http, body["job_id"])
    assert job["job_type"] == "delete" and job["status"] == "completed" and job["results"]["deleted_count"] == 1
    assert await sg.stored(http, gone) is None and await sg.stored(http, keep) is not None
    status, _, _ = await sg.call(http, "POST", "/v3/marketing/contacts/search/emails", {"emails": [gone]})
    assert status == 404
    status, _, body = await sg.call(http, "DELETE", "/v3/marketing/contacts")
    assert status == 400 and body["errors"][0]["field"] == "ids"


async def test_field_definitions_list_custom_fields_by_id_and_reserved_fields(sg, http):
    status, _, body = await sg.call(http, "GET", "/v3/marketing/field_definitions")
    assert status == 200
    assert [(f["id"], f["name"], f["field_type"]) for f in body["custom_fields"]] == [
        ("e1_N", "ltv", "Number"), ("e2_N", "orders", "Number"), ("e3_D", "last_order", "Date"), ("e4_T", "tier", "Text")]
    reserved = {f["name"]: f for f in body["reserved_fields"]}
    assert reserved["first_name"]["id"] == "_rf0_T" and reserved["first_name"]["field_type"] == "Text"
    assert {"last_name", "email", "city", "postal_code", "country", "external_id"} <= set(reserved)
    assert reserved["created_at"]["read_only"] is True


async def test_a_global_unsubscribe_survives_a_later_contacts_put(sg, http):
    email = unique("consent")
    await sg.upsert(http, [{"email": email, "first_name": "Before"}])
    status, _, body = await sg.call(http, "POST", "/v3/asm/suppressions/global", {"recipient_emails": [email.upper()]})
    assert status == 201 and body == {"recipient_emails": [email.upper()]}
    job = await sg.upsert(http, [{"email": email, "first_name": "After"}])
    assert job["status"] == "completed"
    status, _, body = await sg.call(http, "GET", f"/v3/asm/suppressions/global/{email}")
    assert status == 200 and body == {"recipient_email": email}
    stored = await sg.stored(http, email)
    assert stored["suppressed"] is True and stored["first_name"] == "After"
    assert email in (await sg.control(http, "contacts"))["suppressions"]
    status, _, body = await sg.call(http, "GET", f"/v3/asm/suppressions/global/{unique('free')}")
    assert status == 200 and body == {}


async def test_outage_control_answers_503_in_sendgrid_format(sg, http):
    await sg.control(http, "outage", {"seconds": 30})
    try:
        status, headers, body = await sg.call(http, "GET", "/v3/marketing/field_definitions")
        assert status == 503 and body == {"errors": [{"field": None, "message": "sandbox outage"}]}
        assert "X-RateLimit-Reset" in headers
    finally:
        await sg.control(http, "outage", {"seconds": 0})
    status, _, _ = await sg.call(http, "GET", "/v3/marketing/field_definitions")
    assert status == 200


async def test_rate_limits_refuse_beyond_the_window_with_headers(http):
    process, url = start("--rate-limit", "2", "--rate-window", "3600", "--other-rate-limit", "3", "--other-rate-window", "3600",
                         "--job-delay-ms", "0")
    limited = SG(url)
    try:
        put = {"contacts": [{"email": unique("rl")}]}
        statuses = []
        for _ in range(3):
            status, headers, body = await limited.call(http, "PUT", "/v3/marketing/contacts", put)
            statuses.append((status, headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]))
        assert statuses == [(202, "2", "1"), (202, "2", "0"), (429, "2", "0")]
        assert body == {"errors": [{"field": None, "message": "too many requests"}]}
        reset = int(headers["X-RateLimit-Reset"])
        assert time.time() < reset <= time.time() + 3600

        status, headers, _ = await limited.call(http, "GET", "/v3/marketing/field_definitions")
        assert status == 200 and headers["X-RateLimit-Limit"] == "3" and headers["X-RateLimit-Remaining"] == "2"

        stats = await limited.control(http, "stats")
        assert stats["throttled"] == 1
        assert stats["rate_limits"]["upsert"] == {"limit": 2, "window_s": 3600, "peak_per_window": 2, "throttled": 1}
        assert stats["rate_limits"]["other"]["peak_per_window"] == 1
    finally:
        stop([process])
