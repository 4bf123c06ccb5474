"""Permanent failures dead-letter with their reason; replay after a fix brings them through, once."""

import asyncio
import json
import subprocess
import sys
import uuid

import aiohttp

from tests.conftest import API_KEY, ROOT, eventually, post_webhook
from tests.support.samples import customer


def mergetag(system, *args: str) -> dict | list:
    """The operator's CLI, as a real process against the real broker."""
    out = subprocess.run([sys.executable, "-m", "adapters.cli", *args], cwd=ROOT, env=system.env,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


async def dead_letters(system, queue: str) -> list[dict]:
    return await asyncio.to_thread(mergetag, system, "dlq", "list", "--queue", queue, "--json")


async def test_esp_rejection_dead_letters_then_replays_once_after_the_fix(receiver, sandbox, system, http):
    email = f"dlq-{uuid.uuid4().hex[:10]}@example.com"
    with_city = customer(email, first_name="Cy", default_address={"city": "Ottawa", "country_code": "CA"})
    assert (await post_webhook(http, receiver, "customers/update", with_city)).status == 202

    async def rejected():
        # The refusal is recorded before its message is dead-lettered, and other tests' refusals of CITY
        # share the queue: wait for this profile's own letter.
        doc = await system.db.profiles.find_one({"email": email})
        if not doc or doc["esp"]["mailchimp"].get("failed_code") != "esp_rejected":
            return None
        mine = [d for d in await dead_letters(system, "sync") if d["error"] == "esp_rejected" and "CITY" in d["detail"]
                and d["actor"] == "sync_profile" and d.get("profile_id") == doc["_id"]]
        return (mine, doc) if mine else None

    mine, doc = await eventually(rejected, timeout=60)  # each poll runs the CLI: seconds on a busy machine
    assert len(mine) == 1
    letter = mine[0]
    assert "CITY" in letter["detail"]
    assert email not in json.dumps(letter)
    assert letter["retries"] == 0  # a 4xx is permanent: no retries
    assert await sandbox.member(http, email) is None

    # The background sweeper must not resend a refused member over and over.
    await asyncio.sleep(2.5)
    assert len([d for d in await dead_letters(system, "sync")
                if d["actor"] == "sync_profile" and d.get("profile_id") == doc["_id"] and "CITY" in d["detail"]]) == 1

    # The fix: the audience gets the merge field (a real Mailchimp API call).
    async with http.post(f"{sandbox.api}/lists/sandbox/merge-fields", json={"name": "City", "tag": "CITY", "type": "text"},
                         headers={"Authorization": aiohttp.encode_basic_auth("t", API_KEY)}) as r:
        assert r.status == 200

    # The plan first: what a replay would change at the target, values masked; nothing replayed yet.
    plan = await asyncio.to_thread(mergetag, system, "dlq", "replay", "--dry-run", "--queue", "sync", letter["message_id"])
    assert plan["letters"] == 1 and plan["profiles"] == [doc["_id"]]
    assert plan["by_actor_reason"] == [{"actor": "sync_profile", "reason": "esp_rejected", "count": 1}]
    assert {"profile_id": doc["_id"], "field": "CITY", "held": "—", "sent": "•••"} in plan["targets"]["mailchimp"]
    assert "Ottawa" not in json.dumps(plan) and email not in json.dumps(plan)
    assert letter["message_id"] in {d["message_id"] for d in await dead_letters(system, "sync")}

    first = await asyncio.to_thread(mergetag, system, "dlq", "replay", "--rate", "5", "--queue", "sync", letter["message_id"])
    assert first == {"replayed": [letter["message_id"]], "count": 1}
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "adapters.cli", "audit", "--limit", "20"], cwd=ROOT,
                                  env=system.env, capture_output=True, text=True, timeout=60, check=True)
    entries = [json.loads(line) for line in out.stdout.splitlines()]
    mine = [e for e in entries if e["action"] == "dead_letters.replay" and e["selection"].get("rate") == 5.0]
    assert mine and mine[0]["counts"] == {"replayed": 1} and mine[0]["token"].startswith("cli:")
    assert mine[0]["selection"]["queue"] == "sync" and mine[0]["selection"]["ids"] == 1
    member = await eventually(lambda: sandbox.member(http, email))
    assert member["merge_fields"]["CITY"] == "Ottawa"

    async def settled():
        d = await system.db.profiles.find_one({"email": email})
        return d if d["esp"]["mailchimp"]["pending"] is False else None

    before = await eventually(settled)
    second = await asyncio.to_thread(mergetag, system, "dlq", "replay", "--queue", "sync", letter["message_id"])
    assert second == {"replayed": [], "count": 0}
    await asyncio.sleep(1.5)
    after = await system.db.profiles.find_one({"email": email})
    assert after == before
    assert (await sandbox.member(http, email))["update_count"] == member["update_count"]


async def test_actor_failure_alarms_sentry_without_personal_data(system, sentry_sink):
    """A delivery no mapping knows (a permanent failure) dead-letters, and Sentry hears of it, scrubbed."""
    from datetime import datetime, timezone

    from broker import topology
    from broker.publisher import Publisher, publish_delivery
    from schemas.delivery import Delivery

    email = f"leak-{uuid.uuid4().hex[:10]}@example.com"
    queue = topology.events_queue(system.settings.queue_prefix)
    publisher = Publisher(system.settings.amqp_url, [queue], 5)
    ghost = Delivery(source="ghost", topic="x", delivery_id=uuid.uuid4().hex, received_at=datetime.now(timezone.utc),
                     payload={"email": email, "first_name": "Leaky", "note": f"write to {email}"})
    message_id = await publish_delivery(publisher, queue, ghost)
    await publisher.close()

    async def kept():
        return [d for d in await dead_letters(system, "events") if d["message_id"] == message_id]

    (letter,) = await eventually(kept, timeout=60)
    assert letter["error"] == "unsupported_event"
    assert letter["retries"] == 0

    shown = await asyncio.to_thread(mergetag, system, "dlq", "show", message_id)
    assert shown["options"]["dead_letter"]["code"] == "unsupported_event"

    async def alarmed():
        return [e for e in sentry_sink.events() if "UnsupportedEvent" in json.dumps(e.get("exception", {}))]

    assert await eventually(alarmed)
    raw = b"".join(sentry_sink.envelopes)
    assert email.encode() not in raw
    assert b"@example.com" not in raw
    assert b"Leaky" not in raw

    log = (system.logs / "worker.log").read_text()
    assert email not in log
    assert f"process_event#{message_id}" in log


async def test_transient_esp_failures_retry_until_they_pass(receiver, sandbox, system, http):
    email = f"retry-{uuid.uuid4().hex[:10]}@example.com"
    await sandbox.control(http, "faults", {"status": 503, "count": 2})
    assert (await post_webhook(http, receiver, "customers/update", customer(email, first_name="Rita"))).status == 202
    member = await eventually(lambda: sandbox.member(http, email))
    assert member["merge_fields"]["FNAME"] == "Rita"
    assert not [d for d in await dead_letters(system, "sync") if d["detail"].startswith("mailchimp 503")]


async def test_purge_removes_only_what_was_selected(system):
    from datetime import datetime, timezone

    from broker import topology
    from broker.publisher import Publisher, publish_delivery
    from schemas.delivery import Delivery

    queue = topology.events_queue(system.settings.queue_prefix)
    publisher = Publisher(system.settings.amqp_url, [queue], 5)
    ids = [await publish_delivery(publisher, queue, Delivery(source="ghost", topic="x", delivery_id=uuid.uuid4().hex,
                                                              received_at=datetime.now(timezone.utc), payload={}))
           for _ in range(2)]
    await publisher.close()

    async def both_kept():
        present = {d["message_id"] for d in await dead_letters(system, "events")}
        return set(ids) <= present

    await eventually(both_kept)
    purged = await asyncio.to_thread(mergetag, system, "dlq", "purge", "--queue", "events", ids[0])
    assert purged == {"purged": [ids[0]], "count": 1}
    remaining = {d["message_id"] for d in await dead_letters(system, "events")}
    assert ids[0] not in remaining and ids[1] in remaining


def test_replay_resets_retries_and_reasons(rabbitmq):
    import dramatiq
    import pika

    from broker import admin, topology
    from broker.dead_letters import DeadLetters

    prefix = "x" + uuid.uuid4().hex[:8]
    queue = topology.events_queue(prefix)
    tools = DeadLetters(rabbitmq, prefix)
    spent = dramatiq.Message(queue_name=queue, actor_name="process_event", args=({"a": 1},), kwargs={},
                             options={"retries": 8, "traceback": "x", "last_error": {"code": "esp_unavailable"},
                                      "dead_letter": {"code": "esp_unavailable", "failed_at": 1}})
    try:
        admin.queue_depths(rabbitmq, prefix)
        connection = pika.BlockingConnection(pika.URLParameters(rabbitmq))
        connection.channel().basic_publish("", topology.xq_name(queue), spent.encode())
        connection.close()
        assert [d.code for d in tools.list()] == ["esp_unavailable"]
        assert [d.message_id for d in tools.replay(message_ids={spent.message_id})] == [spent.message_id]
        connection = pika.BlockingConnection(pika.URLParameters(rabbitmq))
        _, _, body = connection.channel().basic_get(queue, auto_ack=True)
        connection.close()
        replayed = dramatiq.Message.decode(body)
        assert replayed.options == {"replayed": 1}
        assert replayed.args == spent.args or list(replayed.args) == list(spent.args)
        assert tools.replay() == []
    finally:
        admin.drop_queues(rabbitmq, prefix)
