"""Alerts beyond exceptions reach Sentry once per episode, whichever sync process sees them first,
and say nothing about a person: freshness over its bound and dead letters past a threshold, on a
pipeline of its own (real RabbitMQ, SecantusDB, Redis, the Mailchimp sandbox, a Sentry sink)."""

import asyncio
import json
import uuid

from broker import topology
from tests.conftest import eventually, own_pipeline, post_webhook
from tests.support.samples import customer
from tests.system.test_metrics import publish_broken_message
from workers.sync.alerts import Bounds, Episodes, Readings, check

ALERTS = {"MERGETAG_ALERT_FRESHNESS_P99_S": "0.001", "MERGETAG_ALERT_DEAD_LETTERS": "1", "MERGETAG_ALERT_INTERVAL_S": "0.3",
          "MERGETAG_RETRY_MAX": "1", "MERGETAG_RETRY_MIN_BACKOFF_MS": "100", "MERGETAG_RETRY_MAX_BACKOFF_MS": "200",
          "MERGETAG_SYNC_GRACE_S": "1", "MERGETAG_SYNC_SWEEP_INTERVAL_S": "0.5"}
LEASE_PATH_S = 180


def alerts(sentry_sink, name: str) -> list[dict]:
    return [e for e in sentry_sink.events() if e.get("message") == f"mergetag alert: {name}"
            or e.get("logentry", {}).get("message") == f"mergetag alert: {name}"]


def alerted(sentry_sink, name: str):
    async def sent() -> list[dict] | None:
        return alerts(sentry_sink, name) or None
    return sent


async def test_freshness_and_dead_letter_alerts_are_sent_once_per_episode(mongo_uri, sandbox, sentry_sink, tmp_path, http):
    async with own_pipeline(mongo_uri, sandbox, tmp_path, SENTRY_DSN=sentry_sink.dsn, **ALERTS) as pipeline:
        pipeline.start_sync()
        pipeline.start_sync()  # two syncs: still one alert per episode
        emails = [f"alert-{uuid.uuid4().hex[:10]}@example.com" for _ in range(2)]
        assert (await post_webhook(http, pipeline.url, "customers/create", customer(emails[0]))).status == 202
        await eventually(lambda: sandbox.member(http, emails[0]))
        # The freshness is observed once the send is recorded, which can trail the member's arrival at the
        # ESP: a send whose answer timed out on a stalled machine keeps its lease until it runs out (60 s
        # here), and the next holder records it. The deadline covers that path.
        fresh = await eventually(alerted(sentry_sink, "freshness:mailchimp"), timeout=LEASE_PATH_S)
        # More sends over the bound, in the same episode: no second alert.
        assert (await post_webhook(http, pipeline.url, "customers/create", customer(emails[1]))).status == 202
        await eventually(lambda: sandbox.member(http, emails[1]))

        await asyncio.to_thread(publish_broken_message, topology.events_queue(pipeline.env["MERGETAG_QUEUE_PREFIX"]), "broken-alerts")
        dead = await eventually(alerted(sentry_sink, "dead_letters"), timeout=120)
        await asyncio.sleep(2)  # several checks of both syncs later
        assert len(alerts(sentry_sink, "freshness:mailchimp")) == len(fresh) == 1
        assert len(alerts(sentry_sink, "dead_letters")) == len(dead) == 1
        assert fresh[0]["tags"]["alert"] == "freshness" and fresh[0]["tags"]["target"] == "mailchimp"
        assert fresh[0]["contexts"]["alert"]["bound_s"] == 0.001
        assert dead[0]["contexts"]["alert"]["dead_letters"] >= 1
        raw = json.dumps(alerts(sentry_sink, "freshness:mailchimp") + alerts(sentry_sink, "dead_letters"))
        assert not any(email in raw for email in emails) and "@example.com" not in raw


async def test_an_episode_alerts_once_across_processes_and_again_only_after_it_ended():
    """Two syncs' checks against the same Redis: the first to see the condition sends it, the other
    keeps it; once it is over, the next time it holds is a new episode."""
    prefix = "alerts" + uuid.uuid4().hex[:8]
    first, second = Episodes("redis://127.0.0.1:6379/0", prefix), Episodes("redis://127.0.0.1:6379/0", prefix)
    bounds = Bounds(dead_letters=5)
    try:
        bad, good = Readings(now=0, dead_letters=7), Readings(now=1, dead_letters=0)
        assert await check(first, bad, bounds) == ["dead_letters"]
        assert await check(second, bad, bounds) == []
        assert await check(first, bad, bounds) == []
        assert await check(second, good, bounds) == []
        assert await first.open_now() == frozenset()
        assert await check(second, bad, bounds) == ["dead_letters"]
    finally:
        await first.end("dead_letters")
        await first.close()
        await second.close()
