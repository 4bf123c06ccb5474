"""A backlog goes to Mailchimp in bulk; refused members are recorded and dead-lettered one by one."""

import asyncio
import json
import subprocess
import sys
import uuid

from adapters.esps.base import member_hash
from adapters.esps.mailchimp.member import member_body
from adapters.store.profiles import ProfileStore
from broker import topology
from broker.publisher import Publisher, encode_message
from schemas.profile import Profile
from tests.conftest import AMQP_URL, HASHER, MERGE_FIELDS, ROOT, eventually, own_pipeline, start_mailchimp, stop_sandbox


async def test_batch_with_good_and_bad_members(rabbitmq, mongo_uri, http, tmp_path):
    # A pipeline and a sandbox of its own (other tests' syncs would add to the request counts), with a
    # long grace: the sweeper cannot step in before the batch runs.
    sandbox = start_mailchimp()
    try:
        async with own_pipeline(mongo_uri, sandbox, tmp_path, MERGETAG_SYNC_GRACE_S="30") as pipeline:
            pipeline.start_sync()
            await batch_with_good_and_bad_members(pipeline, sandbox, http)
    finally:
        stop_sandbox(sandbox)


async def batch_with_good_and_bad_members(pipeline, sandbox, http):
    prefix = pipeline.env["MERGETAG_QUEUE_PREFIX"]
    store = ProfileStore.connect(pipeline.env["MERGETAG_MONGODB_URI"], pipeline.env["MERGETAG_MONGODB_DATABASE"], HASHER)
    tag = uuid.uuid4().hex[:8]
    good = [f"batch{n}-{tag}@example.com" for n in range(27)]
    bad = [f"batch{n}-{tag}@localhost" for n in range(3)]  # Mailchimp refuses these addresses
    ids = []
    for email in good + bad:
        profile = Profile(id=f"p_batch_{uuid.uuid4().hex}", email=email)
        member = member_body(profile, MERGE_FIELDS)
        assert await store.save(profile, None, {"mailchimp": (member, member_hash(member))})
        ids.append(profile.id)
    await sandbox.control(http, "stats/reset", {})

    queue = topology.sync_queue(prefix)
    publisher = Publisher(AMQP_URL, [queue], 5)
    message_id, body = encode_message(queue, topology.SYNC_BATCH_ACTOR, (ids, "mailchimp"))
    await publisher.publish(queue, body, message_id)
    await publisher.close()

    async def settled():
        docs = [d async for d in pipeline.db.profiles.find({"_id": {"$in": ids}})]
        return docs if all(not d["esp"]["mailchimp"]["pending"] or d["esp"]["mailchimp"].get("failed_code") for d in docs) else None

    docs = await eventually(settled, timeout=180)
    by_email = {d["email"]: d["esp"]["mailchimp"] for d in docs}
    assert all(by_email[e]["sent_hash"] == by_email[e]["member_hash"] for e in good)
    assert all(by_email[e]["failed_code"] == "esp_rejected" and "sent_hash" not in by_email[e] for e in bad)
    members = await asyncio.gather(*(sandbox.member(http, e) for e in good[:5]))
    assert all(m and m["status"] == "transactional" for m in members)
    stats = await sandbox.control(http, "stats")
    assert stats["requests"].get("POST /3.0/batches", 0) == 1  # one bulk request
    assert stats["requests"].get("PUT /3.0/lists/{list_id}/members/{hash}", 0) == 0

    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "adapters.cli", "dlq", "list", "--queue", "sync", "--json"],
                                  cwd=ROOT, env=pipeline.env, capture_output=True, text=True, timeout=60, check=True)
    letters = [d for d in json.loads(out.stdout) if d["actor"] == "sync_profile" and d["error"] == "esp_rejected"
               and "email_address" in d["detail"]]
    assert len(letters) >= 3
    assert not any("@localhost" in d["detail"] for d in letters)
    await store.close()
