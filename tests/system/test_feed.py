"""The send-time feed, as deployed (``mergetag feed``), over the system's real worker, sync, Redis and
store: what it answers is what the sync sent; a new event or an erasure is visible on the very next
read once the store holds it; tokens, rate limits, ETags and the cache's metrics."""

import asyncio
import json
import uuid

import pytest
from multidict import CIMultiDict

from sandboxes.local import free_port, wait_for_port
from schemas.experiments import Experiment
from tests.conftest import MERGE_FIELDS, SANDBOX_FIELDS, eventually, own_pipeline, post_webhook, spawn, start_mailchimp, stop, stop_sandbox
from tests.support.metrics import value
from tests.support.samples import customer

TOKEN, TIGHT, OTHER = "feed-token-braze", "feed-token-tight", "feed-token-sendgrid-only"
TOKENS = {"braze": {"token": TOKEN, "targets": ["mailchimp", "klaviyo"]},
          "tight": {"token": TIGHT, "targets": ["mailchimp"], "rate_per_s": 3},
          "sendgrid": {"token": OTHER, "targets": ["sendgrid"]}}


@pytest.fixture(scope="module")
async def feed(system, tmp_path_factory):
    port = free_port()
    process = spawn({**system.env, "MERGETAG_FEED_TOKENS": json.dumps(TOKENS)}, tmp_path_factory.mktemp("feed") / "feed.log",
                    "feed", "--port", str(port))
    await asyncio.to_thread(wait_for_port, port, timeout=90, process=process)
    yield f"http://127.0.0.1:{port}"
    stop([process])


async def read(http, url: str, token: str | None = TOKEN, **headers: str):
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(url, headers={**auth, **headers}) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


async def synced_state(system, email: str, version: int | None = None):
    """The profile once the Mailchimp target holds its current member (at ``version`` or later)."""
    doc = await system.db.profiles.find_one({"email": email})
    state = (doc or {}).get("esp", {}).get("mailchimp", {})
    if doc and state.get("sent_hash") and state["sent_hash"] == state.get("member_hash") and (version is None or doc["version"] >= version):
        return doc
    return None


async def test_the_feed_answers_what_the_sync_sent_and_follows_every_change(feed, receiver, system, sandbox, http):
    email = f"feed-{uuid.uuid4().hex[:10]}@example.com"
    assert (await post_webhook(http, receiver, "customers/create", customer(email, first_name="Ada"))).status == 202
    doc = await eventually(lambda: synced_state(system, email), timeout=60)
    pid, sent = doc["_id"], doc["esp"]["mailchimp"]["sent_hash"]
    assert (await sandbox.member(http, email))["merge_fields"]["FNAME"] == "Ada"

    status, headers, body = await read(http, f"{feed}/feed/v1/mailchimp/{email}")
    answer = json.loads(body)
    assert status == 200 and answer["hash"] == sent and answer["fields"]["FNAME"] == "Ada" and answer["target"] == "mailchimp"
    assert email not in body.decode()  # the mapped fields only: no address
    assert headers["Cache-Control"].startswith("private, max-age=") and headers["ETag"]
    # The same by profile id, flat, and through the other ways an ESP can pass the token.
    status, _, flat = await read(http, f"{feed}/feed/v1/mailchimp/{pid}?format=flat")
    assert status == 200 and json.loads(flat) == answer["fields"]
    status, _, _ = await read(http, f"{feed}/feed/v1/mailchimp/{pid}?token={TOKEN}", token=None)
    assert status == 200
    status, _, klaviyo = await read(http, f"{feed}/feed/v1/klaviyo/{email}", token=None, **{"X-Feed-Token": TOKEN})
    assert status == 200 and json.loads(klaviyo)["fields"]["first_name"] == "Ada"
    kdoc = await system.db.profiles.find_one({"_id": pid})
    assert json.loads(klaviyo)["hash"] == kdoc["esp"]["klaviyo"]["member_hash"]
    # Not modified: the ETag it gave.
    status, _, _ = await read(http, f"{feed}/feed/v1/mailchimp/{email}", **{"If-None-Match": headers["ETag"]})
    assert status == 304

    # A new event: once the store holds the new version, the very next read shows it (the merge
    # invalidated the cache before it wrote).
    assert (await post_webhook(http, receiver, "customers/update", customer(email, first_name="Ava"))).status == 202

    async def written():
        d = await system.db.profiles.find_one({"_id": pid})
        return d if d["version"] > doc["version"] else None

    await eventually(written, timeout=60)
    status, _, body = await read(http, f"{feed}/feed/v1/mailchimp/{email}")
    assert status == 200 and json.loads(body)["fields"]["FNAME"] == "Ava"
    status, _, _ = await read(http, f"{feed}/feed/v1/mailchimp/{email}", **{"If-None-Match": headers["ETag"]})
    assert status == 200  # the old ETag no longer matches
    fresh = await eventually(lambda: synced_state(system, email, doc["version"] + 1), timeout=60)
    assert json.loads((await read(http, f"{feed}/feed/v1/mailchimp/{email}"))[2])["hash"] == fresh["esp"]["mailchimp"]["sent_hash"]

    # Tokens: none or wrong is a 401, a token for other targets a 403.
    assert (await read(http, f"{feed}/feed/v1/mailchimp/{email}", token=None))[0] == 401
    assert (await read(http, f"{feed}/feed/v1/mailchimp/{email}", token="not-a-feed-token"))[0] == 401
    assert (await read(http, f"{feed}/feed/v1/mailchimp/{email}", token=OTHER))[0] == 403
    # Nobody known: a 404, with the target's defaults when asked.
    status, _, body = await read(http, f"{feed}/feed/v1/mailchimp/nobody-{uuid.uuid4().hex[:8]}@example.com?defaults=1")
    assert status == 404 and json.loads(body)["error"] == "not_found" and "FNAME" in json.loads(body)["defaults"]

    # The erasure: once the tombstone is written, every read is a 404, by address and by id.
    env = {**system.env}
    proc = await asyncio.create_subprocess_exec(*_cli("erase", "--email", email), env=env, stdout=asyncio.subprocess.PIPE)
    await proc.communicate()
    assert proc.returncode == 0

    async def erased():
        return await system.db.profiles.find_one({"_id": pid, "erased": {"$ne": None}})

    await eventually(erased, timeout=60)
    for ref in (email, pid):
        status, _, body = await read(http, f"{feed}/feed/v1/mailchimp/{ref}")
        assert status == 404 and b"Ava" not in body

    text = (await read(http, f"{feed}/metrics", token=None))[2].decode()
    assert value(text, "mergetag_feed_requests_total", target="mailchimp", result="hit") >= 1
    assert value(text, "mergetag_feed_requests_total", target="mailchimp", result="not_modified") == 1
    assert value(text, "mergetag_feed_seconds_count", result="hit") >= 1


async def test_a_token_over_its_rate_gets_429_with_retry_after(feed, http):
    answers = await asyncio.gather(*(read(http, f"{feed}/feed/v1/mailchimp/nobody@example.com", token=TIGHT) for _ in range(12)))
    limited = [headers for status, headers, _ in answers if status == 429]
    # 12 at once against 3 per second: the burst spans at most two seconds' windows, so at least 6 are refused.
    assert len(limited) >= 6 and all(h["Retry-After"] == "1" for h in limited)
    assert {status for status, _, _ in answers} <= {404, 429}


async def test_an_experiment_bucket_reaches_the_esp_and_the_feed_alike(mongo_uri, tmp_path, http):
    experiment = {"name": "spring-2026", "splits": {"control": 10, "a": 45, "b": 45}}
    sandbox = start_mailchimp(SANDBOX_FIELDS + ",CITY:text,ABBUCKET:text")
    feed = None
    try:
        async with own_pipeline(mongo_uri, sandbox, tmp_path, MERGETAG_SYNC_GRACE_S="1", MERGETAG_SYNC_SWEEP_INTERVAL_S="0.5",
                                MERGETAG_MERGE_FIELDS=json.dumps({**MERGE_FIELDS, "ab_bucket": "ABBUCKET"}),
                                MERGETAG_EXPERIMENTS=json.dumps({"ab_bucket": experiment}),
                                MERGETAG_FEED_TOKENS=json.dumps(TOKENS)) as pipeline:
            pipeline.start_sync()
            port = free_port()
            feed = spawn(pipeline.env, tmp_path / "feed.log", "feed", "--port", str(port))
            await asyncio.to_thread(wait_for_port, port, timeout=90, process=feed)
            emails = [f"ab-{i}-{uuid.uuid4().hex[:8]}@example.com" for i in range(6)]
            for email in emails:
                assert (await post_webhook(http, pipeline.url, "customers/create", customer(email, first_name="Ab"))).status == 202
            split = Experiment.model_validate(experiment)
            for email in emails:
                member = await eventually(lambda email=email: sandbox.member(http, email), timeout=60)
                pid = (await pipeline.db.profiles.find_one({"email": email}))["_id"]
                assert member["merge_fields"]["ABBUCKET"] == split.bucket(pid)
                status, _, body = await read(http, f"http://127.0.0.1:{port}/feed/v1/mailchimp/{email}?format=flat")
                assert status == 200 and json.loads(body)["ABBUCKET"] == split.bucket(pid)
    finally:
        if feed is not None:
            stop([feed])
        stop_sandbox(sandbox)


def _cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "adapters.cli", *args]
