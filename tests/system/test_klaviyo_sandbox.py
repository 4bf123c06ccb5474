"""The Klaviyo sandbox enforces the contract the adapter depends on (its own process, real HTTP),
and what it answers and accepts matches the shapes of Klaviyo's OpenAPI spec."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from functools import cache
from typing import Any

import aiohttp
import jsonschema
import pytest

from sandboxes.local import free_port, wait_for_port
from tests.conftest import ROOT, Reply, eventually, stop

KEY = "pk_test11111111111111111111111111111111"
REVISION = "2026-07-15"
JSONAPI = "application/vnd.api+json"
SPEC = ROOT / "tests" / "specs" / "klaviyo.json"
RATE_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")


@cache
def _spec() -> dict[str, Any]:
    return json.loads(SPEC.read_text())


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0 -> JSON Schema: inline $refs, turn ``nullable`` into a null alternative."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target: Any = _spec()
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        return _json_schema(target)
    converted = {key: _json_schema(value) for key, value in node.items() if key not in ("nullable", "example")}
    return {"anyOf": [converted, {"type": "null"}]} if node.get("nullable") else converted


def conforms(instance: Any, component: str) -> None:
    """Fail unless ``instance`` is valid for a spec component: ``schemas/X`` or ``responses/X``."""
    section, name = component.split("/")
    schema = _spec()["components"][section][name]
    if section == "responses":
        schema = schema["content"][JSONAPI]["schema"]
    jsonschema.validate(instance, _json_schema(schema))


def start(*flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sandboxes.klaviyo", "--port", str(port), "--api-key", KEY, *flags],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process=process)
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def klaviyo() -> Iterator[str]:
    process, url = start("--job-delay-ms", "300")
    yield url
    stop([process])


@pytest.fixture(scope="module")
def limited() -> Iterator[str]:
    """Small limits: profile-import 3/s (steady 100/min), bulk jobs 2/s and 3/min."""
    process, url = start("--import-limits", "3,100", "--bulk-limits", "2,3")
    yield url
    stop([process])


async def call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None, *, key: str | None = KEY,
               revision: str | None = REVISION, content_type: str = JSONAPI) -> Reply:
    headers = {"Authorization": f"Klaviyo-API-Key {key}"} if key else {}
    if revision:
        headers["revision"] = revision
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers["Content-Type"] = content_type
    async with http.request(method, url, data=data, headers=headers) as r:
        return Reply(r.status, dict(r.headers), await r.read())


def profile(email: str | None = None, **attributes: Any) -> dict[str, Any]:
    if email is not None:
        attributes["email"] = email
    return {"type": "profile", "attributes": attributes}


def email() -> str:
    return f"p{uuid.uuid4().hex[:12]}@example.com"


async def upsert(http, base, item: dict[str, Any], query: str = "") -> Reply:
    document = {"data": item}
    conforms(document, "schemas/ProfileUpsertQuery")
    return await call(http, "POST", f"{base}/api/profile-import{query}", document)


async def find(http, base, address: str) -> list[dict[str, Any]]:
    reply = await call(http, "GET", f'{base}/api/profiles?filter=equals(email,"{address}")&additional-fields[profile]=subscriptions')
    assert reply.status == 200, reply.body
    conforms(reply.json(), "schemas/GetProfileResponsePluralConversationsCollectionCompoundDocument")
    return reply.json()["data"]


async def control(http, base, path: str, body: dict[str, Any] | None = None) -> Any:
    method = http.post if body is not None else http.get
    async with method(f"{base}/_sandbox/{path}", json=body) as r:
        return await r.json()


def job_document(items: list[Any], lists: list[str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": items}}}
    if lists:
        data["relationships"] = {"lists": {"data": [{"type": "list", "id": list_id} for list_id in lists]}}
    return {"data": data}


async def wait_for_job(http, base, job_id: str, timeout: float = 10) -> tuple[dict[str, Any], list[str]]:
    """Poll (under the 10/s limit) until complete; returns the job and every status seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = await call(http, "GET", f"{base}/api/profile-bulk-import-jobs/{job_id}")
        assert reply.status == 200, reply.body
        conforms(reply.json(), "schemas/GetProfileImportJobResponseCompoundDocument")
        job = reply.json()["data"]
        if not seen or seen[-1] != job["attributes"]["status"]:
            seen.append(job["attributes"]["status"])
        if job["attributes"]["status"] == "complete":
            return job, seen
        await asyncio.sleep(0.15)
    raise AssertionError(f"job {job_id} not complete after {timeout}s; statuses seen {seen}")


async def all_import_errors(http, url: str) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    next_url: str | None = url
    while next_url:
        reply = await call(http, "GET", next_url)
        assert reply.status == 200, reply.body
        conforms(reply.json(), "schemas/GetImportErrorResponseCollection")
        errors.extend(reply.json()["data"])
        next_url = reply.json()["links"].get("next")
    return errors


def subscription_document(kind: str, consent: str, addresses: list[str]) -> dict[str, Any]:
    items = [{"type": "profile", "attributes": {"email": a, "subscriptions": {"email": {"marketing": {"consent": consent}}}}}
             for a in addresses]
    return {"data": {"type": kind, "attributes": {"profiles": {"data": items}}}}


async def test_auth_needs_the_private_key_in_klaviyos_scheme(klaviyo, http):
    for key in (None, "pk_wrong"):
        reply = await call(http, "GET", f"{klaviyo}/api/profiles", key=key)
        assert reply.status == 401
        conforms(reply.json(), "responses/ClientError")
        assert reply.json()["errors"][0]["code"] in {"not_authenticated", "authentication_failed"}
        assert not any(h in reply.headers for h in RATE_HEADERS)
    async with http.get(f"{klaviyo}/api/profiles", headers={"Authorization": f"Bearer {KEY}", "revision": REVISION}) as r:
        assert r.status == 401
    assert (await call(http, "GET", f"{klaviyo}/api/profiles")).status == 200


async def test_revision_header_is_required_and_must_be_a_date(klaviyo, http):
    for revision in (None, "latest", "2026-13-45", "2026-7-15"):
        reply = await call(http, "GET", f"{klaviyo}/api/profiles", revision=revision)
        assert reply.status == 400, revision
        error = reply.json()["errors"][0]
        assert error["code"] == "invalid" and error["source"] == {"parameter": "revision"}
        conforms(reply.json(), "responses/ClientError")
    assert (await call(http, "GET", f"{klaviyo}/api/profiles", revision="2026-07-15.pre")).status == 200


async def test_post_bodies_must_be_jsonapi(klaviyo, http):
    body = {"data": profile(email())}
    reply = await call(http, "POST", f"{klaviyo}/api/profile-import", body, content_type="application/json")
    assert reply.status == 415
    assert reply.json()["errors"][0]["code"] == "unsupported_media_type"
    assert all(h in reply.headers for h in RATE_HEADERS)
    reply = await call(http, "POST", f"{klaviyo}/api/profile-import", b"{not json")
    assert reply.status == 400 and reply.json()["errors"][0]["code"] == "parse_error"


async def test_profile_import_creates_201_then_updates_200(klaviyo, http):
    address = email()
    created = await upsert(http, klaviyo, profile(address, first_name="Ada"))
    assert created.status == 201 and created.headers["Content-Type"].startswith(JSONAPI)
    conforms(created.json(), "schemas/PostProfileResponse")
    resource = created.json()["data"]
    assert resource["type"] == "profile" and re.fullmatch(r"[0-9A-Z]{26}", resource["id"])
    assert resource["links"]["self"].endswith(f"/api/profiles/{resource['id']}")
    updated = await upsert(http, klaviyo, profile(address.upper(), last_name="Lovelace"))
    assert updated.status == 200 and updated.json()["data"]["id"] == resource["id"]
    assert updated.json()["data"]["attributes"]["first_name"] == "Ada"
    by_external = await upsert(http, klaviyo, profile(None, external_id=f"ext-{address}", first_name="X"))
    assert by_external.status == 201
    again = await upsert(http, klaviyo, profile(None, external_id=f"ext-{address}", title="Dr"))
    assert again.status == 200 and again.json()["data"]["attributes"]["first_name"] == "X"


async def test_null_clears_omitted_is_kept_and_properties_merge(klaviyo, http):
    address = email()
    await upsert(http, klaviyo, profile(address, first_name="Grace", last_name="Hopper", location={"city": "Arlington", "zip": "22201"},
                                        properties={"tier": "gold", "ltv": 120.5, "orders": 3}))
    reply = await upsert(http, klaviyo, profile(address, first_name=None, location={"zip": None},
                                                properties={"ltv": None, "orders": 4, "cart_url": "https://shop/c/1"}),
                         query="?additional-fields[profile]=subscriptions")
    attributes = reply.json()["data"]["attributes"]
    assert attributes["first_name"] is None
    assert attributes["last_name"] == "Hopper"
    assert attributes["location"]["city"] == "Arlington" and attributes["location"]["zip"] is None
    assert attributes["properties"] == {"tier": "gold", "orders": 4, "cart_url": "https://shop/c/1"}
    assert attributes["subscriptions"]["email"]["marketing"]["consent"] == "NEVER_SUBSCRIBED"
    history = [entry for entry in await control(http, klaviyo, "history") if entry[1] == address]
    assert len(history) == 2
    assert history[-1][2] == {"tier": "gold", "orders": 4, "cart_url": "https://shop/c/1", "email": address,
                              "last_name": "Hopper", "location": {"city": "Arlington"}}
    cleared = await upsert(http, klaviyo, profile(address, properties=None))
    assert cleared.json()["data"]["attributes"]["properties"] == {}


async def test_invalid_profiles_get_400_with_a_pointer_and_no_echoed_values(klaviyo, http):
    address = email()
    cases = [
        (profile(address, nickname="Ace"), "/data/attributes/nickname"),
        (profile(address, first_name=5), "/data/attributes/first_name"),
        (profile(address, properties=["a"]), "/data/attributes/properties"),
        (profile(address, location={"planet": "Mars"}), "/data/attributes/location/planet"),
        (profile("not-an-email"), "/data/attributes/email"),
        (profile(None, phone_number="0123"), "/data/attributes/phone_number"),
        (profile(None, first_name="Nobody"), "/data/attributes"),
        ({"type": "person", "attributes": {"email": address}}, "/data/type"),
    ]
    for item, pointer in cases:
        reply = await call(http, "POST", f"{klaviyo}/api/profile-import", {"data": item})
        assert reply.status == 400, (item, reply.body)
        body = reply.json()
        conforms(body, "responses/ClientError")
        error = body["errors"][0]
        assert error["status"] == 400 and error["code"] == "invalid" and error["source"] == {"pointer": pointer}
        assert address not in json.dumps(body) and "not-an-email" not in json.dumps(body)
    assert (await upsert(http, klaviyo, profile("not-an-email"))).json()["errors"][0]["detail"] == "Invalid email address"
    assert await find(http, klaviyo, address) == []
    oversized = {"data": profile(address, properties={"blob": "x" * 110_000})}
    assert (await call(http, "POST", f"{klaviyo}/api/profile-import", oversized)).status == 413


async def test_identifiers_of_two_profiles_conflict(klaviyo, http):
    first, second = email(), email()
    await upsert(http, klaviyo, profile(first))
    other = (await upsert(http, klaviyo, profile(second, external_id=f"ext-{second}"))).json()["data"]["id"]
    reply = await upsert(http, klaviyo, profile(first, external_id=f"ext-{second}"))
    assert reply.status == 409
    error = reply.json()["errors"][0]
    assert error["code"] == "duplicate_profile" and error["meta"]["duplicate_profile_id"] == other
    assert error["source"]["pointer"] == "/data/attributes/external_id"


async def test_bulk_job_runs_asynchronously_and_reports_exactly_the_bad_items(klaviyo, http):
    existing = email()
    await upsert(http, klaviyo, profile(existing, first_name="Old", properties={"keep": 1}))
    good = [email(), email()]
    items = [
        profile(good[0], first_name="One"),
        profile("broken@", first_name="Bad"),
        profile(good[1], properties={"ltv": 10}),
        profile(email(), favourite_colour="blue"),
        profile(None, first_name="No identifier"),
        profile(existing, properties={"orders": 2}),
        profile(None, phone_number="555-0100"),
    ]
    document = job_document(items, lists=["LiSt01"])
    conforms(document, "schemas/ProfileImportJobCreateQuery")
    started = time.monotonic()
    reply = await call(http, "POST", f"{klaviyo}/api/profile-bulk-import-jobs", document)
    assert reply.status == 202, reply.body
    conforms(reply.json(), "schemas/PostProfileImportJobResponse")
    job = reply.json()["data"]
    assert job["type"] == "profile-bulk-import-job" and job["attributes"]["status"] == "queued"
    assert job["attributes"]["total_count"] == 7 and job["attributes"]["completed_count"] == 0
    assert job["attributes"]["expires_at"] > job["attributes"]["created_at"]
    assert job["relationships"]["lists"]["data"] == [{"type": "list", "id": "LiSt01"}]
    found = await find(http, klaviyo, good[0])
    status = (await call(http, "GET", f"{klaviyo}/api/profile-bulk-import-jobs/{job['id']}")).json()["data"]["attributes"]["status"]
    # Nothing is imported while the job is queued (a slow machine may only look once it ran).
    assert found == [] or status != "queued"

    done, seen = await wait_for_job(http, klaviyo, job["id"])
    assert time.monotonic() - started >= 0.3
    # Statuses only move forward; a slow poller may see any of them first (the creation answer said queued).
    order = ["queued", "processing", "complete"]
    assert seen[-1] == "complete" and set(seen) <= set(order) and seen == sorted(seen, key=order.index)
    attributes = done["attributes"]
    assert (attributes["completed_count"], attributes["failed_count"]) == (3, 4)
    assert attributes["started_at"] and attributes["completed_at"] >= attributes["started_at"]

    errors = await all_import_errors(http, done["relationships"]["import-errors"]["links"]["related"] + "?page[size]=2")
    assert len(errors) == 4
    by_index = {int(re.match(r"^/data/attributes/profiles/data/(\d+)(/|$)", e["attributes"]["source"]["pointer"]).group(1)): e
                for e in errors}
    assert set(by_index) == {1, 3, 4, 6}
    for index, error in by_index.items():
        assert error["type"] == "import-error"
        assert error["attributes"]["original_payload"] == items[index]["attributes"]
    assert by_index[1]["attributes"]["source"]["pointer"] == "/data/attributes/profiles/data/1/attributes/email"
    assert by_index[1]["attributes"]["detail"] == "Invalid email address"
    assert by_index[3]["attributes"]["source"]["pointer"] == "/data/attributes/profiles/data/3/attributes/favourite_colour"

    assert (await find(http, klaviyo, good[0]))[0]["attributes"]["first_name"] == "One"
    assert (await find(http, klaviyo, good[1]))[0]["attributes"]["properties"] == {"ltv": 10}
    merged = (await find(http, klaviyo, existing))[0]["attributes"]
    assert merged["first_name"] == "Old" and merged["properties"] == {"keep": 1, "orders": 2}
    assert await find(http, klaviyo, "broken@") == []
    stored = {row["email"]: row for row in await control(http, klaviyo, "profiles")}
    assert stored[good[0]]["lists"] == ["LiSt01"]


async def test_bulk_job_size_limits(klaviyo, http):
    url = f"{klaviyo}/api/profile-bulk-import-jobs"
    too_many = job_document([profile(f"u{i}@example.com") for i in range(10_001)])
    reply = await call(http, "POST", url, too_many)
    assert reply.status == 400
    assert reply.json()["errors"][0]["source"]["pointer"] == "/data/attributes/profiles/data"
    assert await find(http, klaviyo, "u1@example.com") == []
    for empty in ([], None):
        assert (await call(http, "POST", url, job_document(empty))).status == 400
    too_big = job_document([profile(email(), properties={"blob": "x" * 90_000}) for _ in range(60)])
    reply = await call(http, "POST", url, too_big)
    assert reply.status == 413 and reply.json()["errors"][0]["status"] == 413

    small = email()
    reply = await call(http, "POST", url, job_document([profile(email(), properties={"blob": "x" * 110_000}), profile(small)]))
    assert reply.status == 202
    done, _ = await wait_for_job(http, klaviyo, reply.json()["data"]["id"])
    assert (done["attributes"]["completed_count"], done["attributes"]["failed_count"]) == (1, 1)
    errors = await all_import_errors(http, done["relationships"]["import-errors"]["links"]["related"])
    assert [e["attributes"]["source"]["pointer"] for e in errors] == ["/data/attributes/profiles/data/0"]
    assert len(await find(http, klaviyo, small)) == 1


async def test_unknown_job_is_404(klaviyo, http):
    reply = await call(http, "GET", f"{klaviyo}/api/profile-bulk-import-jobs/01NOSUCHJOB0000000000000000")
    assert reply.status == 404 and reply.json()["errors"][0]["code"] == "not_found"


async def test_unsubscribed_profiles_are_never_resubscribed(klaviyo, http):
    gone, fresh = email(), email()
    unsubscribe = subscription_document("profile-subscription-bulk-delete-job", "UNSUBSCRIBED", [gone])
    conforms(unsubscribe, "schemas/SubscriptionDeleteJobCreateQuery")
    reply = await call(http, "POST", f"{klaviyo}/api/profile-subscription-bulk-delete-jobs", unsubscribe)
    assert reply.status == 202 and reply.body == b""
    marketing = (await find(http, klaviyo, gone))[0]["attributes"]["subscriptions"]["email"]["marketing"]
    assert marketing["consent"] == "UNSUBSCRIBED" and marketing["can_receive_email_marketing"] is False

    before = (await control(http, klaviyo, "stats"))["resubscribe_refused"]
    subscribe = subscription_document("profile-subscription-bulk-create-job", "SUBSCRIBED", [gone, fresh])
    conforms(subscribe, "schemas/SubscriptionCreateJobCreateQuery")
    reply = await call(http, "POST", f"{klaviyo}/api/profile-subscription-bulk-create-jobs", subscribe)
    assert reply.status == 202
    assert (await find(http, klaviyo, gone))[0]["attributes"]["subscriptions"]["email"]["marketing"]["consent"] == "UNSUBSCRIBED"
    assert (await find(http, klaviyo, fresh))[0]["attributes"]["subscriptions"]["email"]["marketing"]["consent"] == "SUBSCRIBED"
    assert (await control(http, klaviyo, "stats"))["resubscribe_refused"] == before + 1

    wrong = subscription_document("profile-subscription-bulk-create-job", "UNSUBSCRIBED", [fresh])
    reply = await call(http, "POST", f"{klaviyo}/api/profile-subscription-bulk-create-jobs", wrong)
    assert reply.status == 400
    assert reply.json()["errors"][0]["source"]["pointer"] == "/data/attributes/profiles/data/0/attributes/subscriptions/email/marketing/consent"
    too_many = subscription_document("profile-subscription-bulk-delete-job", "UNSUBSCRIBED", [email() for _ in range(101)])
    assert (await call(http, "POST", f"{klaviyo}/api/profile-subscription-bulk-delete-jobs", too_many)).status == 400


async def test_deletion_job_removes_the_profile_once_it_has_run(klaviyo, http):
    address = email()
    await upsert(http, klaviyo, profile(address, first_name="Temp"))
    assert len(await find(http, klaviyo, address)) == 1
    both = {"data": {"type": "data-privacy-deletion-job", "attributes": {"profile": {"data": {
        "type": "profile", "attributes": {"email": address, "phone_number": "+15005550006"}}}}}}
    reply = await call(http, "POST", f"{klaviyo}/api/data-privacy-deletion-jobs", both)
    assert reply.status == 400 and len(await find(http, klaviyo, address)) == 1
    document = {"data": {"type": "data-privacy-deletion-job", "attributes": {"profile": {"data": {
        "type": "profile", "attributes": {"email": address}}}}}}
    conforms(document, "schemas/DataPrivacyCreateDeletionJobQuery")
    reply = await call(http, "POST", f"{klaviyo}/api/data-privacy-deletion-jobs", document)
    assert reply.status == 202 and reply.body == b""
    # A job, as at Klaviyo: the profile goes once it has run.
    await eventually(lambda: _gone(http, klaviyo, address))
    assert address not in {row["email"] for row in await control(http, klaviyo, "profiles")}
    assert (await upsert(http, klaviyo, profile(address))).status == 201


async def _gone(http, klaviyo, address) -> bool:
    return await find(http, klaviyo, address) == []


async def test_get_profiles_filters(klaviyo, http):
    address = email()
    created = (await upsert(http, klaviyo, profile(address, external_id=f"crm-{address}"))).json()["data"]["id"]
    assert [p["id"] for p in await find(http, klaviyo, address)] == [created]
    assert await find(http, klaviyo, "nobody@example.com") == []
    for expression in (f"equals(external_id,'crm-{address}')", f'equals(id,"{created}")', f'any(email,["{address}","x@example.com"])'):
        reply = await call(http, "GET", f"{klaviyo}/api/profiles?filter={expression}")
        assert [p["id"] for p in reply.json()["data"]] == [created], expression
        assert "subscriptions" not in reply.json()["data"][0]["attributes"]
    for expression in ("equals(first_name,'a')", "contains(email,'a')", "equals(email,unquoted)"):
        reply = await call(http, "GET", f"{klaviyo}/api/profiles?filter={expression}")
        assert reply.status == 400 and reply.json()["errors"][0]["source"] == {"parameter": "filter"}
    reply = await call(http, "GET", f"{klaviyo}/api/profiles?additional-fields[profile]=everything")
    assert reply.status == 400


async def test_outage_and_faults_answer_in_klaviyos_error_format(klaviyo, http):
    await control(http, klaviyo, "outage", {"seconds": 30})
    try:
        reply = await call(http, "GET", f"{klaviyo}/api/profiles")
        assert reply.status == 503
        assert reply.json()["errors"][0]["code"] == "service_unavailable"
    finally:
        await control(http, klaviyo, "outage", {"seconds": 0})
    assert (await call(http, "GET", f"{klaviyo}/api/profiles")).status == 200
    await control(http, klaviyo, "faults", {"status": 429, "count": 1})
    reply = await upsert(http, klaviyo, profile(email()))
    assert reply.status == 429 and reply.headers["Retry-After"] == "1"
    assert reply.json()["errors"][0]["code"] == "throttled"


async def test_burst_window_throttles_with_retry_after(limited, http):
    # All four at once, so they land in one burst window however slow this machine is.
    replies = await asyncio.gather(*(upsert(http, limited, profile(email())) for _ in range(4)))
    admitted = [r for r in replies if r.status == 201]
    assert sorted(r.status for r in replies) == [201, 201, 201, 429]
    assert sorted(r.headers["RateLimit-Remaining"] for r in admitted) == ["97", "98", "99"]
    for reply in admitted:
        assert reply.headers["RateLimit-Limit"] == "100" and 1 <= int(reply.headers["RateLimit-Reset"]) <= 60
    throttled = next(r for r in replies if r.status == 429)
    assert throttled.headers["Retry-After"] == "1"
    assert not any(h in throttled.headers for h in RATE_HEADERS)
    conforms(throttled.json(), "responses/ClientError")
    assert throttled.json()["errors"][0]["code"] == "throttled"
    bucket = (await control(http, limited, "stats"))["rate_limits"]["POST /api/profile-import"]
    assert bucket["throttled"] == 1 and bucket["peak_admitted_1s"] == 3 and bucket["peak_attempted_1s"] == 4
    await asyncio.sleep(1.1)
    assert (await upsert(http, limited, profile(email()))).status == 201


async def test_steady_window_throttles_after_the_burst_window_reopens(limited, http):
    async def job() -> Reply:
        return await call(http, "POST", f"{limited}/api/profile-bulk-import-jobs", job_document([profile(email())]))

    started = time.monotonic()
    first = [await job() for _ in range(3)]
    assert [r.status for r in first] == [202, 202, 429]
    assert [r.headers["RateLimit-Remaining"] for r in first[:2]] == ["2", "1"]
    assert first[2].headers["Retry-After"] == "1"
    await asyncio.sleep(1.1)
    fourth, fifth = await job(), await job()
    assert fourth.status == 202 and fourth.headers["RateLimit-Remaining"] == "0"
    # The steady window opened with the first job: what is left of its 60 s, however long this took.
    assert fifth.status == 429 and 60 - math.ceil(time.monotonic() - started) - 1 <= int(fifth.headers["Retry-After"]) <= 60
    assert fifth.json()["errors"][0]["code"] == "throttled"
    stats = await control(http, limited, "stats")
    bucket = stats["rate_limits"]["POST /api/profile-bulk-import-jobs"]
    assert (bucket["peak_admitted_1s"], bucket["peak_admitted_60s"], bucket["throttled"]) == (2, 3, 2)
    assert stats["throttled"] >= 2
    other = await call(http, "GET", f"{limited}/api/profiles")
    assert other.status == 200 and other.headers["RateLimit-Limit"] == "750"


def conforms_as_one_profile(document: Any) -> None:
    """``GET /api/profiles/{id}``'s document. The vendor spec defines its ``data`` exactly as an item of the
    profile collection, which is what the trimmed copy keeps."""
    collection = _spec()["components"]["schemas"]["GetProfileResponsePluralConversationsCollectionCompoundDocument"]
    jsonschema.validate(document["data"], _json_schema(collection["properties"]["data"]["items"]))
    conforms(document["links"], "schemas/ObjectLinks")
    assert set(document) == {"data", "links"}


async def create(http, base, item: dict[str, Any], query: str = "") -> Reply:
    """``POST /api/profiles``. A ProfileCreateQuery is the spec's ProfileUpsertQuery less id, meta and ``_kx``."""
    document = {"data": item}
    conforms(document, "schemas/ProfileUpsertQuery")
    assert set(item) <= {"type", "attributes"} and "_kx" not in item.get("attributes", {})
    return await call(http, "POST", f"{base}/api/profiles{query}", document)


def phone() -> str:
    return "+1" + str(uuid.uuid4().int)[:10]


async def test_create_profile_answers_201_with_the_new_profile(klaviyo, http):
    address, external_id, number = email(), f"crm-{uuid.uuid4().hex[:8]}", phone()
    reply = await create(http, klaviyo, profile(address, external_id=external_id, phone_number=number, first_name="Ada",
                                                location={"city": "London"}, properties={"tier": "gold"}),
                         query="?additional-fields[profile]=subscriptions")
    assert reply.status == 201 and reply.headers["Content-Type"].startswith(JSONAPI), reply.body
    conforms(reply.json(), "schemas/PostProfileResponse")
    created = reply.json()["data"]
    assert re.fullmatch(r"[0-9A-Z]{26}", created["id"]) and created["links"]["self"].endswith(f"/api/profiles/{created['id']}")
    attributes = created["attributes"]
    assert (attributes["email"], attributes["external_id"], attributes["phone_number"]) == (address, external_id, number)
    assert attributes["first_name"] == "Ada" and attributes["location"]["city"] == "London" and attributes["properties"] == {"tier": "gold"}
    assert attributes["subscriptions"]["email"]["marketing"]["consent"] == "NEVER_SUBSCRIBED"
    assert reply.headers["RateLimit-Limit"] == "750"
    assert [p["id"] for p in await find(http, klaviyo, address)] == [created["id"]]


async def test_create_profile_with_a_known_identifier_is_409_duplicate_profile(klaviyo, http):
    address, external_id, number = email(), f"crm-{uuid.uuid4().hex[:8]}", phone()
    existing = (await create(http, klaviyo, profile(address, external_id=external_id, phone_number=number))).json()["data"]["id"]
    before = (await control(http, klaviyo, "stats"))["profiles"]
    for attributes in ({"email": address.upper()}, {"email": email(), "external_id": external_id}, {"phone_number": number}):
        reply = await create(http, klaviyo, {"type": "profile", "attributes": {"first_name": "Twin", **attributes}})
        assert reply.status == 409, (attributes, reply.body)
        conforms(reply.json(), "responses/ClientError")
        error = reply.json()["errors"][0]
        assert (error["status"], error["code"], error["title"]) == (409, "duplicate_profile", "Conflict.")
        assert error["meta"] == {"duplicate_profile_id": existing} and error["source"] == {"pointer": "/data/attributes"}
        assert address not in json.dumps(reply.json())
    assert (await control(http, klaviyo, "stats"))["profiles"] == before
    assert (await find(http, klaviyo, address))[0]["attributes"]["first_name"] is None


async def test_create_profile_refuses_what_a_create_query_does_not_hold(klaviyo, http):
    address = email()
    cases = [
        ({"type": "profile", "id": "01ABCDEFGHJKMNPQRSTVWXYZ00", "attributes": {"email": address}}, "/data/id"),
        ({"type": "profile", "attributes": {"email": address}, "meta": {"patch_properties": {"unset": "a"}}}, "/data/meta"),
        (profile(address, _kx="opaque"), "/data/attributes/_kx"),
        (profile(address, nickname="Ace"), "/data/attributes/nickname"),
        (profile("not-an-email"), "/data/attributes/email"),
        (profile(None, phone_number="0123"), "/data/attributes/phone_number"),
        (profile(None, first_name="Nobody"), "/data/attributes"),
        ({"type": "person", "attributes": {"email": address}}, "/data/type"),
    ]
    for item, pointer in cases:
        reply = await call(http, "POST", f"{klaviyo}/api/profiles", {"data": item})
        assert reply.status == 400, (item, reply.body)
        conforms(reply.json(), "responses/ClientError")
        error = reply.json()["errors"][0]
        assert error["code"] == "invalid" and error["source"] == {"pointer": pointer}, item
    reply = await call(http, "POST", f"{klaviyo}/api/profiles", {"data": profile(address)}, content_type="application/json")
    assert reply.status == 415
    oversized = {"data": profile(address, properties={"blob": "x" * 110_000})}
    assert (await call(http, "POST", f"{klaviyo}/api/profiles", oversized)).status == 413
    assert (await call(http, "POST", f"{klaviyo}/api/profiles?additional-fields[profile]=everything", {"data": profile(address)})).status == 400
    assert await find(http, klaviyo, address) == []


async def test_get_profile_by_id_and_404_once_absent(klaviyo, http):
    address = email()
    profile_id = (await create(http, klaviyo, profile(address, first_name="Grace"))).json()["data"]["id"]
    await upsert(http, klaviyo, profile(address, last_name="Hopper"))
    reply = await call(http, "GET", f"{klaviyo}/api/profiles/{profile_id}")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith(JSONAPI)
    conforms_as_one_profile(reply.json())
    found = reply.json()["data"]
    assert found["id"] == profile_id and reply.json()["links"]["self"] == found["links"]["self"]
    assert (found["attributes"]["first_name"], found["attributes"]["last_name"]) == ("Grace", "Hopper")
    assert "subscriptions" not in found["attributes"]
    assert reply.headers["RateLimit-Limit"] == "750"
    with_consent = await call(http, "GET", f"{klaviyo}/api/profiles/{profile_id}?additional-fields[profile]=subscriptions")
    conforms_as_one_profile(with_consent.json())
    assert with_consent.json()["data"]["attributes"]["subscriptions"]["email"]["marketing"]["consent"] == "NEVER_SUBSCRIBED"

    absent = await call(http, "GET", f"{klaviyo}/api/profiles/01NOSUCHPROFILE00000000000")
    assert absent.status == 404
    conforms(absent.json(), "responses/ClientError")
    assert absent.json()["errors"][0]["code"] == "not_found"

    document = {"data": {"type": "data-privacy-deletion-job", "attributes": {"profile": {"data": {"type": "profile", "id": profile_id}}}}}
    assert (await call(http, "POST", f"{klaviyo}/api/data-privacy-deletion-jobs", document)).status == 202

    async def gone() -> bool:
        return (await call(http, "GET", f"{klaviyo}/api/profiles/{profile_id}")).status == 404

    await eventually(gone)
