"""`mergetag dlq` filters on real dead letters: by actor, reason, age, profile and ESP target, combined."""

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from unittest import mock

from adapters.esps.base import member_hash
from adapters.esps.registry import build_esp
from adapters.store.profiles import ProfileStore
from broker import topology
from broker.publisher import Publisher, encode_message, publish_delivery
from schemas.delivery import Delivery
from schemas.profile import Profile
from tests.conftest import ESP_KEYS, HASHER, ROOT, eventually
from tests.system.test_dead_letters import mergetag


async def dlq(system, *args: str):
    return await asyncio.to_thread(mergetag, system, "dlq", *args)


async def refused_sync(system, store: ProfileStore, publisher: Publisher, esp: str, email: str) -> str:
    """A profile whose member ``esp`` refuses, and a sync of it: a real sync_profile dead letter."""
    with mock.patch.dict(os.environ, ESP_KEYS):
        client = build_esp(esp, system.settings.esp_targets()[esp])
    profile = Profile(id=f"p_filter_{uuid.uuid4().hex}", email=email)
    member = client.member(profile)
    await client.close()
    assert await store.save(profile, None, {esp: (member, member_hash(member))})
    queue = topology.sync_queue(system.settings.queue_prefix)
    message_id, body = encode_message(queue, topology.SYNC_PROFILE_ACTOR, (profile.id, esp))
    await publisher.publish(queue, body, message_id)
    return profile.id


async def test_dlq_filters_select_real_dead_letters_by_actor_reason_age_profile_and_target(system):
    store = ProfileStore.connect(system.settings.mongodb_uri, system.settings.mongodb_database, HASHER)
    prefix = system.settings.queue_prefix
    publisher = Publisher(system.settings.amqp_url, topology.all_queues(prefix), 5)
    tag = uuid.uuid4().hex[:8]
    try:
        at_mailchimp = await refused_sync(system, store, publisher, "mailchimp", f"f-{tag}@localhost")  # Mailchimp refuses it
        at_klaviyo = await refused_sync(system, store, publisher, "klaviyo", f"f-{tag}@example")  # no top-level domain
        ghost = await publish_delivery(publisher, topology.events_queue(prefix), Delivery(
            source="ghost", topic="x", delivery_id=uuid.uuid4().hex, received_at=datetime.now(timezone.utc), payload={}))
    finally:
        await publisher.close()
        await store.close()

    async def all_dead():
        letters = await dlq(system, "list", "--json")
        found = {(d.get("profile_id"), d.get("esp")) for d in letters} | {d["message_id"] for d in letters}
        return letters if {(at_mailchimp, "mailchimp"), (at_klaviyo, "klaviyo"), ghost} <= found else None

    await eventually(all_dead, timeout=60)

    mine = await dlq(system, "list", "--json", "--actor", "sync_profile", "--reason", "esp_rejected", "--profile", at_mailchimp)
    assert mine and {(d["profile_id"], d["esp"], d["actor"], d["error"]) for d in mine} == {
        (at_mailchimp, "mailchimp", "sync_profile", "esp_rejected")}
    assert {d["profile_id"] for d in await dlq(system, "list", "--json", "--target", "klaviyo", "--profile", at_klaviyo)} == {at_klaviyo}
    assert await dlq(system, "list", "--json", "--target", "klaviyo", "--profile", at_mailchimp) == []
    events = await dlq(system, "list", "--json", "--actor", "process_event", "--reason", "unsupported_event", "--queue", "events")
    assert ghost in {d["message_id"] for d in events}
    assert all(d["actor"] == "process_event" and d["error"] == "unsupported_event" for d in events)

    def ours(letters):
        return {d["message_id"] for d in letters if d["message_id"] == ghost or d.get("profile_id") in (at_mailchimp, at_klaviyo)}

    assert len(ours(await dlq(system, "list", "--json", "--newer-than", "1h"))) >= 3
    assert ours(await dlq(system, "list", "--json", "--older-than", "1h")) == set()
    assert await eventually(lambda: dlq(system, "list", "--json", "--older-than", "1s", "--profile", at_klaviyo))

    # Replay and purge act on every letter matching the filters, and on nothing else.
    nothing = await dlq(system, "purge", "--target", "klaviyo", "--profile", at_mailchimp)
    assert nothing == {"purged": [], "count": 0}
    klaviyo_ids = {d["message_id"] for d in await dlq(system, "list", "--json", "--profile", at_klaviyo)}
    purged = await dlq(system, "purge", "--profile", at_klaviyo, "--target", "klaviyo")
    assert set(purged["purged"]) == klaviyo_ids and purged["count"] == len(klaviyo_ids)
    assert await dlq(system, "list", "--json", "--profile", at_klaviyo) == []
    mailchimp_ids = {d["message_id"] for d in mine}

    async def all_older():
        older = await dlq(system, "list", "--json", "--older-than", "1s", "--profile", at_mailchimp)
        return {d["message_id"] for d in older} == mailchimp_ids

    await eventually(all_older)
    replayed = await dlq(system, "replay", "--actor", "sync_profile", "--reason", "esp_rejected", "--profile", at_mailchimp,
                         "--target", "mailchimp", "--older-than", "1s")
    assert set(replayed["replayed"]) == mailchimp_ids and replayed["count"] == len(mailchimp_ids)
    assert ghost in {d["message_id"] for d in await dlq(system, "list", "--json", "--queue", "events")}


def test_replay_and_purge_without_ids_filters_or_all_select_nothing(system):
    for action in ("replay", "purge"):
        out = subprocess.run([sys.executable, "-m", "adapters.cli", "dlq", action], cwd=ROOT, env=system.env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and '"selection_required"' in out.stdout
