"""Convergence after a storm (issue 11), with a smaller burst: while 1,000 webhooks over 100 customers
flow — updates with later first names, orders, duplicates under new delivery ids, all shuffled — the
pipeline's broker connections drop, its store restarts, its events worker is SIGKILLed, Mailchimp
fails one write in five, Klaviyo answers a storm of 429s and SendGrid is down for 20 s. Every ESP
then holds each customer's final state, every profile is exact, nothing is pending or dead-lettered.

The broker "restart" is a proxy in front of RabbitMQ that drops every connection of this pipeline and
refuses new ones for a few seconds (what a restart does to its clients: unacked messages go back to
their queues, publishes fail until it is back). Restarting the machine's RabbitMQ itself would drop
every other test session's connections too (they share it): their receivers would answer 503 where
their tests expect 202, and their checks would fail while it is down — a risk to others for no more
proof here, since the pipeline only ever sees its connections close and its reconnects refused.

The store restarts for real (SIGTERM, then a new SecantusDB on the same port and storage directory),
as does the worker (SIGKILL, then a new process). ``bench/storm.py`` runs the full storm and times it.
"""

from __future__ import annotations

import asyncio
import uuid

from tests.conftest import eventually
from tests.support.stack import FAST, TARGETS, Stack
from tests.support.storm import Plan, burst, converge, profile_problems, storm

EVENTS, CUSTOMERS = 1_000, 100
RATE = 35.0
"""Webhooks per second: the burst flows for about 30 s, so every fault comes while it does."""
PLAN = Plan(outage_s=20, throttle_s=15, broker_down_s=5, store_down_s=2, mailchimp_every=5)
CONVERGE_S = 300


async def test_every_esp_holds_the_final_state_after_a_storm(rabbitmq, http, tmp_path):
    shot = burst(uuid.uuid4().hex[:8], EVENTS, CUSTOMERS)
    stack = Stack(tmp_path, **FAST)
    try:
        await asyncio.to_thread(stack.start)
        await eventually(lambda: asyncio.to_thread(stack.ready), timeout=90)  # process start-up on a busy machine
        sender, injected = await storm(stack, http, shot.deliveries, PLAN, RATE)
        assert sender.accepted == len(shot.deliveries)
        assert sender.refusals.get("503", 0) > 0  # while the broker was down, the receiver could not confirm

        done, held = await converge(stack, http, shot.final, timeout=CONVERGE_S)
        assert set(done) == set(TARGETS), (held, injected)

        async def exact():
            problems = await profile_problems(stack.db, shot.final, TARGETS)
            return not problems or None

        await eventually(exact, timeout=60)  # the sync's record of each send follows the ESP's answer
        assert stack.dead_letters() == {}
        faults = {esp: (await stack.control(http, esp, "stats"))["faults_given"] for esp in TARGETS}
        assert faults["mailchimp"].get("503", 0) > 0 and faults["klaviyo"].get("429", 0) >= PLAN.throttled
        assert faults["sendgrid"].get("outage", 0) > 0  # SendGrid was called while it was down
        assert next(f for f in injected if f["fault"] == "broker_connections_dropped")["connections"] > 0
        assert await asyncio.to_thread(stack.ready)  # the consumers came back through the proxy
    finally:
        await stack.close()
