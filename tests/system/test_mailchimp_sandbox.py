"""The sandbox enforces the Mailchimp contract the adapter depends on (run as its own process)."""

import asyncio
import hashlib
import io
import json
import tarfile
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import aiohttp
import pytest
import yarl

from adapters.esps.mailchimp.client import Mailchimp
from schemas.errors import EspRejected, EspUnavailable
from tests.conftest import API_KEY, Sandbox, eventually, start_mailchimp, stop_sandbox


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth("anyone", key)}


def path(email: str) -> str:
    return f"/lists/sandbox/members/{hashlib.md5(email.lower().encode()).hexdigest()}"


async def put(http, sandbox, email, body, key=API_KEY, member_path=None):
    async with http.put(sandbox.api + (member_path or path(email)), json=body, headers=auth(key)) as r:
        return r.status, r.content_type, await r.json()


async def test_auth_is_basic_with_the_key_as_password(sandbox, http):
    status, content_type, body = await put(http, sandbox, "a@example.com", {}, key="wrong-us1")
    assert status == 401 and content_type == "application/problem+json"
    assert body["title"] == "API Key Invalid"


async def test_member_path_must_be_the_md5_of_the_lowercased_email(sandbox, http):
    body = {"email_address": "Case@Example.com", "status_if_new": "subscribed"}
    status, _, problem = await put(http, sandbox, "x", body, member_path=path("other@example.com"))
    assert status == 400 and problem["errors"][0]["field"] == "email_address"
    status, _, member = await put(http, sandbox, "case@example.com", body)
    assert status == 200 and member["status"] == "subscribed"


async def test_new_members_need_status_if_new_and_valid_statuses(sandbox, http):
    status, _, problem = await put(http, sandbox, "n@example.com", {"email_address": "n@example.com"})
    assert status == 400 and problem["errors"][0]["field"] == "status_if_new"
    status, _, problem = await put(http, sandbox, "n@example.com", {"email_address": "n@example.com", "status_if_new": "maybe"})
    assert status == 400


async def test_merge_tags_must_be_defined_and_typed(sandbox, http):
    base = {"email_address": "m@example.com", "status_if_new": "transactional"}
    status, _, problem = await put(http, sandbox, "m@example.com", {**base, "merge_fields": {"NOPE": "x"}})
    assert status == 400 and problem["errors"][0]["field"] == "merge_fields.NOPE"
    status, _, problem = await put(http, sandbox, "m@example.com", {**base, "merge_fields": {"LTV": "lots"}})
    assert status == 400
    status, _, problem = await put(http, sandbox, "m@example.com", {**base, "merge_fields": {"LASTORDER": "01/02/2024"}})
    assert status == 400
    status, _, member = await put(http, sandbox, "m@example.com", {**base, "merge_fields": {"LTV": 3.5, "LASTORDER": "2024-02-01"}})
    assert status == 200 and member["merge_fields"] == {"LTV": 3.5, "LASTORDER": "2024-02-01"}


async def test_status_if_new_never_changes_an_existing_member_and_unsubscribed_stays(sandbox, http):
    email = "consent@example.com"
    await put(http, sandbox, email, {"email_address": email, "status": "unsubscribed", "status_if_new": "unsubscribed"})
    status, _, member = await put(http, sandbox, email, {"email_address": email, "status_if_new": "subscribed"})
    assert status == 200 and member["status"] == "unsubscribed"
    status, _, problem = await put(http, sandbox, email, {"email_address": email, "status": "subscribed"})
    assert status == 400 and problem["title"] == "Member In Compliance State"


async def test_more_than_ten_simultaneous_connections_get_429(quiet_sandbox, http):
    # A sandbox nobody else calls, and requests slow enough that all 16 are open at once on a busy machine.
    sandbox = quiet_sandbox
    await sandbox.control(http, "latency", {"ms": 1500})
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as many:
            async def ping():
                async with many.get(f"{sandbox.api}/ping", headers=auth()) as r:
                    return r.status
            statuses = await asyncio.gather(*(ping() for _ in range(16)))
    finally:
        await sandbox.control(http, "latency", {"ms": 0})
    assert statuses.count(200) == 10
    assert statuses.count(429) == 6


async def test_adapter_maps_errors_to_retryable_and_permanent(sandbox, http):
    esp = Mailchimp(sandbox.api, API_KEY, "sandbox", {})
    try:
        with pytest.raises(EspRejected) as rejected:
            await esp.upsert({"email_address": "r@example.com", "status_if_new": "transactional", "merge_fields": {"NOPE": 1}})
        assert "NOPE" in rejected.value.detail and "r@example.com" not in rejected.value.detail
        await sandbox.control(http, "faults", {"status": 503, "count": 1})
        with pytest.raises(EspUnavailable):
            await esp.upsert({"email_address": "r@example.com", "status_if_new": "transactional"})
        await esp.upsert({"email_address": "r@example.com", "status_if_new": "transactional"})
        unreachable = Mailchimp("http://127.0.0.1:1/3.0", API_KEY, "sandbox", {}, timeout=2)
        with pytest.raises(EspUnavailable):
            await unreachable.upsert({"email_address": "r@example.com", "status_if_new": "transactional"})
        await unreachable.close()
    finally:
        await esp.close()


async def test_batch_operations_upsert_consent_safely_and_name_each_refusal(sandbox, http):
    """The adapter's bulk path: batch operations carrying the single upsert's PUT, polled to the end.
    A member who unsubscribed at Mailchimp stays unsubscribed; a refused member is named alone."""
    gone = f"gone-{uuid.uuid4().hex[:6]}@example.com"
    assert (await put(http, sandbox, gone, {"email_address": gone, "status_if_new": "subscribed"}))[0] == 200
    assert (await put(http, sandbox, gone, {"email_address": gone, "status": "unsubscribed"}))[0] == 200
    good = [f"ok{n}-{uuid.uuid4().hex[:6]}@example.com" for n in range(3)]
    members = [{"email_address": e, "status_if_new": "subscribed", "merge_fields": {"FNAME": "Bo"}} for e in [*good, gone]]
    members.insert(1, {"email_address": f"bad-{uuid.uuid4().hex[:6]}@example.com", "status_if_new": "subscribed",
                       "merge_fields": {"NOPE": "x"}})
    esp = Mailchimp(sandbox.api, API_KEY, "sandbox", {}, job_timeout=20)
    await sandbox.control(http, "stats/reset", {})
    try:
        refused = await esp.upsert_batch(members)
    finally:
        await esp.close()
    assert list(refused) == [members[1]["email_address"]] and "NOPE" in refused[members[1]["email_address"]]
    assert "@" not in refused[members[1]["email_address"]]
    for email in good:
        assert (await sandbox.member(http, email))["merge_fields"]["FNAME"] == "Bo"
    unsubscribed = await sandbox.member(http, gone)
    assert unsubscribed["status"] == "unsubscribed" and unsubscribed["merge_fields"]["FNAME"] == "Bo"
    requests = (await sandbox.control(http, "stats"))["requests"]
    assert requests["POST /3.0/batches"] == 1 and "POST /3.0/lists/{list_id}" not in requests


async def call(http, sandbox, method, member_path, body=None):
    """One API call on a path below ``/3.0``; ``member_path`` is sent as given (already percent-encoded)."""
    url = yarl.URL(sandbox.api + member_path, encoded=True)
    async with http.request(method, url, json=body, headers=auth()) as r:
        return r.status, r.content_type, None if r.status == 204 else await r.json()


async def test_every_problem_names_an_instance_of_its_own(sandbox, http):
    """Mailchimp support traces one failed request by its ``instance``: two equal failures get two."""
    bad = {"email_address": "i@example.com", "status_if_new": "subscribed", "merge_fields": {"NOPE": "x"}}
    problems = [
        (await put(http, sandbox, "i@example.com", bad))[2],
        (await put(http, sandbox, "i@example.com", bad))[2],
        (await put(http, sandbox, "i@example.com", {}, key="wrong-us1"))[2],
        (await call(http, sandbox, "GET", path(f"absent-{uuid.uuid4().hex[:6]}@example.com")))[2],
        (await call(http, sandbox, "GET", "/lists/no-such-list/members"))[2],
        (await call(http, sandbox, "GET", "/no-such-resource"))[2],
        (await call(http, sandbox, "DELETE", "/batches"))[2],
    ]
    assert [p["status"] for p in problems] == [400, 400, 401, 404, 404, 404, 405]
    instances = [p["instance"] for p in problems]
    assert len(set(instances)) == len(instances)
    assert all(str(uuid.UUID(i)) == i for i in instances)
    assert all(set(p) >= {"type", "title", "status", "detail", "instance"} for p in problems)


async def test_the_email_address_stands_in_for_the_subscriber_hash(sandbox, http):
    email = f"Stand.In-{uuid.uuid4().hex[:6]}@Example.com"
    body = {"email_address": email, "status_if_new": "subscribed", "merge_fields": {"FNAME": "Ann"}}
    encoded = "/lists/sandbox/members/" + quote(email, safe="")
    assert "%40" in encoded
    status, _, created = await call(http, sandbox, "PUT", encoded, body)
    assert status == 200 and created["id"] == hashlib.md5(email.lower().encode()).hexdigest()
    for member_path in (f"/lists/sandbox/members/{email}", f"/lists/sandbox/members/{email.lower()}", path(email)):
        status, _, member = await call(http, sandbox, "GET", member_path)
        assert status == 200 and member["id"] == created["id"], member_path
    status, _, patched = await call(http, sandbox, "PATCH", f"/lists/sandbox/members/{email.upper()}", {"merge_fields": {"FNAME": "Bea"}})
    assert status == 200 and patched["id"] == created["id"] and patched["merge_fields"]["FNAME"] == "Bea"
    status, _, problem = await put(http, sandbox, email, body, member_path=f"/lists/sandbox/members/other-{email}")
    assert status == 400 and problem["errors"][0]["field"] == "email_address"
    assert (await call(http, sandbox, "DELETE", encoded))[0] == 204
    assert (await sandbox.member(http, email))["status"] == "archived"


async def test_patch_changes_only_what_it_names_and_never_creates(sandbox, http):
    email = f"patch-{uuid.uuid4().hex[:6]}@example.com"
    status, _, _ = await put(http, sandbox, email, {"email_address": email, "status_if_new": "subscribed",
                                                    "merge_fields": {"FNAME": "Cy", "LNAME": "Old", "LTV": 10}})
    assert status == 200
    status, content_type, member = await call(http, sandbox, "PATCH", path(email), {"merge_fields": {"LNAME": "New"}})
    assert status == 200 and content_type == "application/json"
    assert member["merge_fields"] == {"FNAME": "Cy", "LNAME": "New", "LTV": 10} and member["status"] == "subscribed"
    assert (await call(http, sandbox, "PATCH", path(email), {"status": "unsubscribed"}))[2]["merge_fields"]["LNAME"] == "New"
    status, _, problem = await call(http, sandbox, "PATCH", path(email), {"status": "subscribed"})
    assert status == 400 and problem["title"] == "Member In Compliance State"
    status, _, problem = await call(http, sandbox, "PATCH", path(email), {"merge_fields": {"LTV": "lots"}})
    assert status == 400 and problem["errors"][0]["field"] == "merge_fields.LTV"
    assert (await sandbox.member(http, email))["merge_fields"]["LTV"] == 10

    absent = f"absent-{uuid.uuid4().hex[:6]}@example.com"
    status, content_type, problem = await call(http, sandbox, "PATCH", path(absent), {"merge_fields": {"FNAME": "No"}})
    assert (status, content_type, problem["status"], problem["title"]) == (404, "application/problem+json", 404, "Resource Not Found")
    assert await sandbox.member(http, absent) is None


async def test_patch_with_a_new_email_address_moves_the_member(sandbox, http):
    old, new, taken = (f"{name}-{uuid.uuid4().hex[:6]}@example.com" for name in ("old", "new", "taken"))
    for email in (old, taken):
        assert (await put(http, sandbox, email, {"email_address": email, "status_if_new": "subscribed", "merge_fields": {"FNAME": "Di"}}))[0] == 200
    status, _, problem = await call(http, sandbox, "PATCH", path(old), {"email_address": taken})
    assert status == 400 and problem["title"] == "Member Exists"
    status, _, moved = await call(http, sandbox, "PATCH", path(old), {"email_address": new})
    assert status == 200 and moved["id"] == hashlib.md5(new.encode()).hexdigest() and moved["merge_fields"] == {"FNAME": "Di"}
    assert await sandbox.member(http, old) is None
    assert (await sandbox.member(http, new))["email_address"] == new


@pytest.fixture(scope="module")
def quiet_sandbox() -> Iterator[Sandbox]:
    """A Mailchimp sandbox of this module's own, so that counts of batches are exact."""
    started = start_mailchimp()
    yield started
    stop_sandbox(started)


async def test_get_batches_lists_every_batch_request_a_page_at_a_time(quiet_sandbox, http):
    sandbox = quiet_sandbox
    ids = []
    for n in range(3):
        email = f"listed{n}-{uuid.uuid4().hex[:6]}@example.com"
        operation = {"method": "PUT", "path": path(email), "operation_id": str(n),
                     "body": json.dumps({"email_address": email, "status_if_new": "subscribed"})}
        async with http.post(f"{sandbox.api}/batches", json={"operations": [operation]}, headers=auth()) as r:
            assert r.status == 200
            ids.append((await r.json())["id"])
    status, _, listed = await call(http, sandbox, "GET", "/batches")
    assert status == 200 and listed["total_items"] == 3 and [b["id"] for b in listed["batches"]] == ids
    assert all(b["total_operations"] == 1 for b in listed["batches"])
    status, _, first = await call(http, sandbox, "GET", "/batches?count=2")
    status, _, rest = await call(http, sandbox, "GET", "/batches?count=2&offset=2")
    assert [b["id"] for b in first["batches"]] == ids[:2] and [b["id"] for b in rest["batches"]] == ids[2:]
    assert first["total_items"] == rest["total_items"] == 3
    assert (await call(http, sandbox, "GET", "/batches?offset=3"))[2] == {"batches": [], "total_items": 3}

    async def all_finished():
        batches = (await call(http, sandbox, "GET", "/batches"))[2]["batches"]
        return all(b["status"] == "finished" and b["finished_operations"] == 1 for b in batches)

    await eventually(all_finished)
    for query, field in (("count=0", "count"), ("count=1001", "count"), ("count=ten", "count"), ("offset=-1", "offset")):
        status, content_type, problem = await call(http, sandbox, "GET", f"/batches?{query}")
        assert (status, content_type) == (400, "application/problem+json") and problem["errors"][0]["field"] == field, query


async def test_batch_operations_take_the_email_address_and_patch_too(sandbox, http):
    email = f"Batch.Patch-{uuid.uuid4().hex[:6]}@Example.com"
    assert (await put(http, sandbox, email, {"email_address": email, "status_if_new": "subscribed", "merge_fields": {"FNAME": "Ed"}}))[0] == 200
    absent = f"absent-{uuid.uuid4().hex[:6]}@example.com"
    operations = [
        {"method": "PATCH", "path": f"lists/sandbox/members/{quote(email, safe='')}", "operation_id": "by-email",
         "body": json.dumps({"merge_fields": {"LNAME": "Ng"}})},
        {"method": "PATCH", "path": f"/lists/sandbox/members/{absent}", "operation_id": "absent", "body": json.dumps({"status": "subscribed"})},
    ]
    async with http.post(f"{sandbox.api}/batches", json={"operations": operations}, headers=auth()) as r:
        batch_id = (await r.json())["id"]

    async def finished():
        batch = (await call(http, sandbox, "GET", f"/batches/{batch_id}"))[2]
        return batch if batch["status"] == "finished" else None

    batch = await eventually(finished)
    assert (batch["finished_operations"], batch["errored_operations"]) == (2, 1)
    async with http.get(batch["response_body_url"]) as r:
        with tarfile.open(fileobj=io.BytesIO(await r.read()), mode="r:gz") as tar:
            results = {item["operation_id"]: item for member in tar.getmembers() if member.isfile()
                       for item in json.load(tar.extractfile(member))}
    assert results["by-email"]["status_code"] == 200 and results["absent"]["status_code"] == 404
    assert json.loads(results["absent"]["response"])["instance"]
    assert (await sandbox.member(http, email))["merge_fields"] == {"FNAME": "Ed", "LNAME": "Ng"}
    assert await sandbox.member(http, absent) is None


async def test_faults_one_write_in_n_and_for_a_while_in_the_esps_own_format(quiet_sandbox, http):
    """The storm's controls: a share of writes failing, every write failing until a moment (reads never), and an
    outage that lasts until it refused a number of calls."""
    await quiet_sandbox.control(http, "stats/reset", {})
    email = f"faults-{uuid.uuid4().hex[:6]}@example.com"
    body = {"email_address": email, "status_if_new": "subscribed"}
    await quiet_sandbox.control(http, "faults", {"status": 503, "every": 5})
    try:
        statuses = [(await put(http, quiet_sandbox, email, body))[0] for _ in range(10)]
        async with http.get(quiet_sandbox.api + path(email), headers=auth()) as r:
            assert r.status == 200
    finally:
        await quiet_sandbox.control(http, "faults", {"clear": True})
    assert statuses == [200, 200, 200, 200, 503, 200, 200, 200, 200, 503]
    await quiet_sandbox.control(http, "faults", {"status": 503, "seconds": 600})
    try:
        status, content_type, problem = await put(http, quiet_sandbox, email, body)
        assert status == 503 and content_type == "application/problem+json" and problem["instance"]
    finally:
        await quiet_sandbox.control(http, "faults", {"clear": True})
    assert (await put(http, quiet_sandbox, email, body))[0] == 200
    await quiet_sandbox.control(http, "outage", {"seconds": 0, "calls": 2})  # over at once, but for two calls
    async with http.get(quiet_sandbox.api + path(email), headers=auth()) as r:
        assert r.status == 503
    assert [(await put(http, quiet_sandbox, email, body))[0] for _ in range(2)] == [503, 200]
    assert (await quiet_sandbox.control(http, "stats"))["faults_given"] == {"503": 3, "outage": 2}
