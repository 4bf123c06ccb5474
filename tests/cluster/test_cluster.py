"""mergetag on a three-node RabbitMQ cluster (quorum queues), with events flowing from concurrent
senders that retry on anything but a 2xx, as Shopify does: nodes stopped and brought back, the
worker and the sync SIGKILLed mid-batch. Every event that got a 2xx is merged exactly once (each
customer's order count and lifetime value are exact: an order merged twice would count twice) and
every ESP sandbox ends with each customer's final state; nothing is left dead-lettered.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from tests.conftest import eventually
from tests.support.cluster import Cluster
from tests.support.stack import FAST, TARGETS, Stack
from tests.support.storm import Sender, burst, converge, profile_problems

EVENTS, CUSTOMERS, RATE = 600, 60, 20.0
"""About 30 s of webhooks: every fault comes while they flow."""
CONVERGE_S = 300
MAILCHIMP_JOBS = {"mailchimp": {"timeout_s": 5, "job_timeout_s": 10}}
"""A sync killed while a Mailchimp batch job may still run leaves its batch lease to run out by itself
(nothing may overtake a job that can still land): 2 × timeout + 5 s + the job timeout, 325 s with the
defaults. The other two targets have these in the test system already."""
REFUSALS_END_S = 30.0
"""How soon after a node is lost the receiver answers 2xx again (RabbitMQ elects new queue leaders
within seconds; the receiver reconnects to the next node)."""


async def _flow(stack: Stack, http, faults: dict[float, object]) -> tuple[Sender, list[tuple[str, float]], object]:
    shot = burst(uuid.uuid4().hex[:8], EVENTS, CUSTOMERS)
    injected: list[tuple[str, float]] = []
    loop, running = asyncio.get_running_loop(), []
    at = {int(share * len(shot.deliveries)): fault for share, fault in faults.items()}

    async def inject(fault, after: asyncio.Task | None) -> None:  # noqa: ANN001
        if after is not None:
            await after  # in order: a node is brought back only once its stop is done, however slow the machine
        began = time.time()
        name = await asyncio.to_thread(fault)
        injected.append((name, began))

    def due(i: int) -> None:
        if i in at:
            running.append(loop.create_task(inject(at[i], running[-1] if running else None)))

    sender = Sender(http, stack.receiver_url, concurrency=8)
    await sender.send_all(shot.deliveries, RATE, due)
    await asyncio.gather(*running)
    return sender, injected, shot


async def _converged(stack: Stack, http, shot, injected) -> None:  # noqa: ANN001
    done, held = await converge(stack, http, shot.final, timeout=CONVERGE_S)
    assert set(done) == set(TARGETS), (held, injected)

    async def exact():
        problems = await profile_problems(stack.db, shot.final, TARGETS)
        return not problems or None

    await eventually(exact, timeout=60)
    assert stack.dead_letters() == {}


async def test_nodes_lost_and_back_lose_nothing_and_the_receiver_recovers_within_seconds(cluster: Cluster, http, tmp_path):
    stack = Stack(tmp_path, amqp_url=cluster.amqp_url, **FAST)
    stopped: list = []

    def stop_leader() -> str:
        node = cluster.node_of_leader(f"{stack.prefix}.events")
        node.stop()
        stopped.append(node)
        return f"stopped {node.name} (leader of the events queue)"

    def start_again() -> str:
        node = stopped.pop()
        node.start()
        cluster.wait_clustered()
        return f"started {node.name}"

    def stop_another() -> str:
        leader = cluster.node_of_leader(f"{stack.prefix}.events")
        node = next(n for n in cluster.nodes if n is not leader)
        node.stop()
        stopped.append(node)
        return f"stopped {node.name}"

    try:
        await asyncio.to_thread(stack.start)
        await eventually(lambda: asyncio.to_thread(stack.ready), timeout=90)
        sender, injected, shot = await _flow(stack, http, {0.2: stop_leader, 0.45: start_again, 0.6: stop_another, 0.85: start_again})
        assert sender.accepted == len(shot.deliveries)
        losses = [at for name, at in injected if name.startswith("stopped")]
        assert len(losses) == 2, injected
        for lost in losses:
            late = [at - lost for at, _ in sender.refused_at if at >= lost and (at - lost) > REFUSALS_END_S
                    and not any(lost < other <= at for other in losses if other != lost)]
            assert late == [], (injected, sender.refused_at)
        await _converged(stack, http, shot, injected)
    finally:
        for node in stopped:
            node.start()
        await stack.close()


async def test_a_worker_and_a_sync_killed_mid_batch_lose_nothing_and_double_nothing(cluster: Cluster, http, tmp_path):
    stack = Stack(tmp_path, amqp_url=cluster.amqp_url, targets=MAILCHIMP_JOBS, **FAST)

    def kill_worker() -> str:
        stack.kill_worker()
        return "worker SIGKILL"

    def kill_sync() -> str:
        stack.kill_sync()
        return "sync SIGKILL"

    try:
        await asyncio.to_thread(stack.start)
        await eventually(lambda: asyncio.to_thread(stack.ready), timeout=90)
        sender, injected, shot = await _flow(stack, http, {0.3: kill_worker, 0.6: kill_sync, 0.8: kill_worker})
        assert sender.accepted == len(shot.deliveries)
        assert [name for name, _ in injected] == ["worker SIGKILL", "sync SIGKILL", "worker SIGKILL"]
        await _converged(stack, http, shot, injected)
    finally:
        await stack.close()
