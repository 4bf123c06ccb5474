"""Webhooks per second the receiver accepts with durable confirms, next to a bare aiohttp handler.

Both servers run as their own processes on this machine and are measured in the
same run, alternating, by the same load generator; the ratio is what to compare
across runs (the machines are shared and noisy). ``p50_ms``/``p99_ms``: the receiver's
time from request to answer (a 202 only after RabbitMQ's confirm) at ``--concurrency``
connections. Prints one JSON object.

    python bench/receiver_throughput.py [--requests 4000] [--concurrency 64] [--rounds 2] [--cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.sources.shopify import sign  # noqa: E402
from bench._cluster import start_cluster  # noqa: E402
from broker import admin, topology  # noqa: E402
from sandboxes.local import free_port, wait_for_port  # noqa: E402

SECRET = "bench-secret"
AMQP_URL = os.environ.get("MERGETAG_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")

# On the receiver's own event loop (uvloop), so the ratio is the receiver's work, not the loop's.
BARE = """
import sys
import uvloop
from aiohttp import web
async def handle(request):
    await request.read()
    return web.json_response({"status": "accepted"}, status=202)
app = web.Application()
app.router.add_post("/webhooks/{source}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, loop=uvloop.new_event_loop())
"""


def forget_keys(prefix: str) -> None:
    """The run's de-duplication keys and trail entries: they would outlive it by days in a shared Redis."""
    client = redis.Redis.from_url(os.environ.get("MERGETAG_REDIS_URL", "redis://127.0.0.1:6379/0"))
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    for at in range(0, len(keys), 1000):
        client.delete(*keys[at:at + 1000])
    client.close()


def payload(i: int) -> bytes:
    sample = json.loads((ROOT / "tests/support/fixtures/shopify/CustomersCreate.json").read_text())
    sample.update(email=f"bench-{i}@example.com", updated_at="2026-01-01T00:00:00Z")
    return json.dumps(sample).encode()


async def load(url: str, bodies: list[bytes], concurrency: int, latencies: list[float] | None = None) -> tuple[float, int]:
    """Send every body once with ``concurrency`` in flight; returns (requests/s, accepted). Each
    request's time to its answer goes into ``latencies`` (seconds)."""
    accepted = 0
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        while not queue.empty():
            body = queue.get_nowait()
            headers = {"X-Shopify-Topic": "customers/update", "X-Shopify-Hmac-Sha256": sign(body, SECRET),
                       "X-Shopify-Webhook-Id": str(uuid.uuid4()), "Content-Type": "application/json"}
            sent = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                accepted += response.status == 202
            if latencies is not None:
                latencies.append(time.perf_counter() - sent)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(bodies) / elapsed, accepted


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cluster", action="store_true", help="on a three-node RabbitMQ cluster of the benchmark's own (quorum queues replicated)")
    args = parser.parse_args()
    amqp = start_cluster() if args.cluster else AMQP_URL

    prefix = "bench" + uuid.uuid4().hex[:8]
    env = {**os.environ, "MERGETAG_QUEUE_PREFIX": prefix, "MERGETAG_SHOPIFY_SECRETS": SECRET, "MERGETAG_AMQP_URL": amqp,
           "MERGETAG_LOG_LEVEL": "WARNING"}
    receiver_port, bare_port = free_port(), free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "adapters.cli", "receiver", "--host", "127.0.0.1", "--port", str(receiver_port)],
                                cwd=ROOT, env=env)
    bare = subprocess.Popen([sys.executable, "-c", BARE, str(bare_port)])
    try:
        wait_for_port(receiver_port, process=receiver)
        wait_for_port(bare_port, process=bare)
        bodies = [payload(i) for i in range(args.requests)]
        await load(f"http://127.0.0.1:{receiver_port}/webhooks/shopify", bodies[:200], args.concurrency)  # warm-up
        await load(f"http://127.0.0.1:{bare_port}/webhooks/shopify", bodies[:200], args.concurrency)
        receiver_runs, bare_runs, accepted_total, latencies = [], [], 0, []
        for _ in range(args.rounds):
            rps, accepted = await load(f"http://127.0.0.1:{receiver_port}/webhooks/shopify", bodies, args.concurrency, latencies)
            receiver_runs.append(rps)
            accepted_total += accepted
            bare_runs.append((await load(f"http://127.0.0.1:{bare_port}/webhooks/shopify", bodies, args.concurrency))[0])
        in_queue = admin.queue_depths(amqp, prefix)[topology.events_queue(prefix)]
    finally:
        receiver.terminate()
        bare.terminate()
        receiver.wait()
        bare.wait()
        admin.drop_queues(amqp, prefix)
        forget_keys(prefix)

    receiver_rps, bare_rps = statistics.median(receiver_runs), statistics.median(bare_runs)
    cuts = statistics.quantiles(latencies, n=100)
    print(json.dumps({
        "receiver_rps": round(receiver_rps, 1),
        "bare_rps": round(bare_rps, 1),
        "ratio": round(receiver_rps / bare_rps, 3),
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "p50_ms": round(cuts[49] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
        "accepted": accepted_total,
        "confirmed_in_queue": in_queue - 200,
        "broker": "cluster" if args.cluster else "single_node",
    }))


if __name__ == "__main__":
    asyncio.run(main())
