"""What quorum queues cost against classic ones, measured in the same run on the same broker:
persistent messages published with confirms (``--in-flight`` unconfirmed at once, as the receiver
keeps many in flight) and consumed with acks (prefetch ``--prefetch``), per queue type, on this
machine's RabbitMQ and, with ``--cluster``, on a three-node cluster of the benchmark's own (where a
quorum queue replicates every message to a majority before confirming). Prints one JSON object:
``<broker>.<type>.publish_per_s`` / ``consume_per_s``, and ``<broker>.quorum_to_classic`` ratios.

    python bench/queue_cost.py [--messages 5000] [--in-flight 64] [--prefetch 64] [--cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

import aiormq
from pamqp import commands as spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._cluster import start_cluster  # noqa: E402
from broker import nodes  # noqa: E402

TYPES = {"classic": {}, "classic_priority": {"x-max-priority": 10}, "quorum": {"x-queue-type": "quorum"}}
"""``classic_priority``: the queues mergetag declared before quorum queues."""
BODY = json.dumps({"payload": "x" * 900}).encode()  # about a webhook's size


async def measure(url: str, arguments: dict, messages: int, in_flight: int, prefetch: int) -> dict[str, float]:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = f"bench-qc-{uuid.uuid4().hex[:8]}"
        await channel.queue_declare(queue, durable=True, arguments=arguments)
        gate = asyncio.Semaphore(in_flight)

        async def publish() -> None:
            async with gate:
                await channel.basic_publish(BODY, routing_key=queue, properties=spec.Basic.Properties(delivery_mode=2))

        started = time.perf_counter()
        await asyncio.gather(*(publish() for _ in range(messages)))
        published = time.perf_counter() - started

        consumer = await connection.channel()
        await consumer.basic_qos(prefetch_count=prefetch)
        done, seen = asyncio.get_running_loop().create_future(), 0

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal seen
            await message.channel.basic_ack(message.delivery_tag)
            seen += 1
            if seen == messages and not done.done():
                done.set_result(None)

        started = time.perf_counter()
        await consumer.basic_consume(queue, on_message)
        await asyncio.wait_for(done, timeout=600)
        consumed = time.perf_counter() - started
        await channel.queue_delete(queue)
        return {"publish_per_s": round(messages / published, 1), "consume_per_s": round(messages / consumed, 1)}
    finally:
        await connection.close()


async def broker(url: str, args: argparse.Namespace) -> dict[str, object]:
    """Both types, alternating, ``--rounds`` times; the median of each."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in TYPES}
    for _ in range(args.rounds):
        for name, arguments in TYPES.items():
            runs[name].append(await measure(url, arguments, args.messages, args.in_flight, args.prefetch))
    result: dict[str, object] = {}
    for name, found in runs.items():
        result[name] = {key: sorted(run[key] for run in found)[len(found) // 2] for key in found[0]}
    for base in ("classic", "classic_priority"):
        result[f"quorum_to_{base}"] = {key: round(result["quorum"][key] / result[base][key], 3) for key in ("publish_per_s", "consume_per_s")}
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cluster", action="store_true", help="also on a three-node cluster of the benchmark's own")
    args = parser.parse_args()
    local = nodes.urls(os.environ.get("MERGETAG_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))[0]
    out: dict[str, object] = {"messages": args.messages, "in_flight": args.in_flight, "prefetch": args.prefetch, "rounds": args.rounds,
                              "single_node": await broker(local, args)}
    if args.cluster:
        out["cluster"] = await broker(nodes.urls(await asyncio.to_thread(start_cluster))[0], args)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
