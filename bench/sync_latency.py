"""The sync end to end, to all three ESP sandboxes, through the real processes.

Latency is always from an event's webhook request (answered 202) to the ESP holding that version or a
newer one. Store requests are counted at the server (``serverStatus().network.numRequests``: one per
command, a bulk write is one) until the pipeline is quiet again (no message left in its queues: the
syncs still queued once every ESP holds the change find nothing left to send, but they are the events'
work too; ``*_until_held`` stop when the ESPs hold it), less the background: the sweeper's polls (its
reads) as they were made, and the rest (driver heartbeats, this bench's ``serverStatus`` calls) as a
rate measured over an idle interval (``--idle`` s) with the same processes up, times the interval
counted (``*store_background_per_event*``: what was subtracted, so the raw count is the sum). The
worker and the sync run under ``bench/_counted.py``, which counts the commands each sends (the sync's
sweeper apart): that is how the polls are known, and ``store_commands_per_event*`` shows where the
requests go, by sender and command; ``store_unattributed_per_event*`` is what the server counted
beyond the senders and the idle rate (near 0 when the accounting holds). Phases, in order:

- steady: ``--events`` over ``--profiles`` at ``--rate`` with the sync running. Reports per ESP the
  latency (p50, p99) and the ESP write requests made (``steady``).
- steps: ``--step-events`` over ``--step-profiles`` new profiles at ``--step-start`` events/s, then
  doubling, each from a quiet pipeline and waited out until every ESP holds its final versions; stops
  after the first step whose p99 passes 1 s at any ESP, that is not all accepted or delivered (within
  ``--step-timeout``), that this client could not send at 90% of its rate, or at ``--step-max-rate``.
  Each step (``steps``): latency per ESP and store requests per accepted event (the idle rate measured
  once, before the first step). ``max_rate_p99_under_1s`` is the highest step rate that passed (0 when
  none did; ``note`` says why the steps stopped); ``store_ops_per_event_live`` is the first (lowest)
  step's count: the merge and the sync to every ESP.
- the store, measured while the pipeline is quiet (after the steps, with the worker and the sync
  stopped, before the backlog's events are sent): the same server's own unordered bulk-upsert rate
  (``bench/_store.py``, as in ``bench/merge_throughput.py``) with a merged profile of this run, read
  from its database, ``--store-upserts-per-id`` upserts per id (``store_bulk_upserts_per_s``);
  ``ratio_to_store_bulk`` is ``max_rate_p99_under_1s`` over it. The store's CPU time (its process's,
  background included) per accepted event of each step (``store_cpu_ms_per_event``) against that per
  bulk upsert there (``store_cpu_ms_per_bulk_upsert``) says how much of the store one event uses; the
  store's CPU while the pipeline is idle (the sweeper's polls, heartbeats) is ``store_cpu_ms_per_s_idle``.
- backlog: the worker and the sync are down while ``--backlog`` events for as many new profiles queue
  in RabbitMQ; the worker starts and merges them all, then the sync starts. Reports per ESP the write
  requests made against the minimum possible, ceil(profiles / the ESP's batch size), and ``drain_s``
  from the sync's start until the ESP holds every backlog profile (``backlog``).
  ``store_ops_per_event_backlog`` counts from the worker's start, per accepted event, split by stage
  (merge: until the sync starts; sync: after); the idle rates are those with only the worker up, then
  with both up, each measured before they were stopped, once no profile waits for any ESP.

``merge_batch_max`` is the worker's setting (the project's default unless the environment sets
``MERGETAG_MERGE_BATCH_MAX``); ``peak_rss_mb`` is each process's peak resident memory (VmHWM, with its
child processes), the largest over its incarnations. ``idle_requests_per_s`` are the idle rates (the
sweeper's polls and the rest); ``bench_s`` is how long it all took.

Everything runs here: RabbitMQ and Redis on localhost, a SecantusDB, the Mailchimp, Klaviyo and
SendGrid sandboxes, the receiver, the worker and the sync. Prints one JSON object.

    python bench/sync_latency.py [--events 300] [--profiles 100] [--rate 10] [--step-start 5] [--step-events 300]
        [--step-max-rate 1280] [--idle 10] [--backlog 1000] [--esps mailchimp,klaviyo,sendgrid]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pymongo import AsyncMongoClient  # noqa: E402

from adapters.esps.registry import descriptor  # noqa: E402
from adapters.settings import Settings  # noqa: E402
from adapters.sources.shopify import sign  # noqa: E402
from bench._cluster import start_cluster  # noqa: E402
from bench._store import bulk_upserts, server_requests  # noqa: E402
from broker import admin  # noqa: E402
from sandboxes import klaviyo as klaviyo_sandbox  # noqa: E402
from sandboxes import sendgrid as sendgrid_sandbox  # noqa: E402
from sandboxes.local import free_port, start_secantus, wait_for_port  # noqa: E402

SECRET = "bench-secret"
KEY = "benchkey000000000000000000000000-us1"
# Where each sandbox keeps the first name, and which of its routes write profiles (not job polls or reads).
NAME_FIELD = {"mailchimp": "FNAME", "klaviyo": "first_name", "sendgrid": "first_name"}
WRITES = {
    "mailchimp": ("PUT /3.0/lists/{list_id}/members/{hash}", "POST /3.0/batches"),
    "klaviyo": ("POST /api/profile-import", "POST /api/profile-bulk-import-jobs"),
    "sendgrid": ("PUT /v3/marketing/contacts",),
}
P99_BAR_S = 1.0


def body(email: str, version: int) -> bytes:
    sample = json.loads((ROOT / "tests/support/fixtures/shopify/CustomersCreate.json").read_text())
    sample.update(email=email, first_name=f"v{version}", updated_at=f"2026-01-01T{version // 3600:02d}:{version // 60 % 60:02d}:{version % 60:02d}Z",
                  admin_graphql_api_id=f"gid://shopify/Customer/{abs(hash(email)) % 10**12}")
    return json.dumps(sample).encode()


class Bench:
    def __init__(self, http: aiohttp.ClientSession, receiver: str, sandboxes: dict[str, str]) -> None:
        self.http, self.receiver, self.sandboxes = http, receiver, sandboxes
        self.accepted: list[tuple[float, str, int]] = []

    async def send(self, email: str, version: int) -> None:
        data = body(email, version)
        headers = {"X-Shopify-Topic": "customers/update", "X-Shopify-Hmac-Sha256": sign(data, SECRET),
                   "X-Shopify-Webhook-Id": uuid.uuid4().hex}
        # Timed from the request, not from reading the 202: on a busy machine the ESP may hold the
        # change before this client gets round to reading its answer. (A few ms pessimistic.)
        sent_at = time.time()
        async with self.http.post(f"{self.receiver}/webhooks/shopify", data=data, headers=headers) as r:
            if r.status == 202:
                self.accepted.append((sent_at, email, version))

    async def paced(self, emails: list[str], events: int, rate: float) -> float:
        """Send ``events`` round-robin over ``emails`` at ``rate``; returns the rate this client managed."""
        start, tasks = time.monotonic(), []
        for i in range(events):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(self.send(emails[i % len(emails)], i // len(emails))))
        span = time.monotonic() - start
        await asyncio.gather(*tasks)
        return (events - 1) / span if span > 0 else math.inf

    def final(self, emails: list[str]) -> dict[str, int]:
        return {e: max(v for _, em, v in self.accepted if em == e) for e in emails if any(em == e for _, em, _ in self.accepted)}

    async def control(self, esp: str, path: str, body: Any = None) -> Any:
        method = self.http.post if body is not None else self.http.get
        async with method(f"{self.sandboxes[esp]}/_sandbox/{path}", json=body) as r:
            return await r.json()

    async def writes(self, esp: str) -> dict[str, list[tuple[float, int]]]:
        found: dict[str, list[tuple[float, int]]] = {}
        for ts, email, fields in await self.control(esp, "history"):
            name = str(fields.get(NAME_FIELD[esp]) or "")
            if name.startswith("v"):
                found.setdefault(email, []).append((ts, int(name[1:])))
        return found

    async def latencies(self, esp: str) -> list[float]:
        """Per accepted event, the time until ``esp`` first held that version or a newer one (if it did)."""
        writes = await self.writes(esp)
        found = []
        for at, email, version in self.accepted:
            done = next((ts for ts, v in writes.get(email, []) if v >= version and ts >= at - 0.001), None)
            if done is not None:
                found.append(done - at)
        return found

    async def wait_for(self, final: dict[str, int], timeout: float) -> dict[str, float]:
        """Until every ESP holds each profile's final version; returns when each ESP got there."""
        done: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(done) < len(self.sandboxes) and time.monotonic() < deadline:
            for esp in self.sandboxes:
                if esp in done:
                    continue
                held = {e: max(v for _, v in w) for e, w in (await self.writes(esp)).items()}
                if all(held.get(e, -1) >= v for e, v in final.items()):
                    done[esp] = time.time()
            await asyncio.sleep(0.5)
        return done

    async def requests(self, esp: str) -> int:
        stats = await self.control(esp, "stats")
        return sum(stats["requests"].get(route, 0) for route in WRITES[esp])


def quantiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (math.nan, math.nan)
    q = statistics.quantiles(values, n=100)
    return round(q[49], 3), round(q[98], 3)


def peak_rss_mb(pid: int) -> float:
    """VmHWM of ``pid`` plus that of each of its descendants (found by their PPid): each one's own peak,
    so the sum bounds the tree's peak from above."""
    status: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
            except OSError:
                continue
            status[int(entry.name)] = (int(fields["PPid"]), int(fields.get("VmHWM", "0 kB").split()[0]))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += status.get(current, (0, 0))[1]
        todo += [child for child, (parent, _) in status.items() if parent == current]
    return round(total / 1024, 1)


class Processes:
    """The pipeline's processes by role, keeping each role's peak memory across restarts. The worker and
    the sync run under ``bench._counted``, which counts the MongoDB commands each sends."""

    def __init__(self, env: dict[str, str], counts: Path) -> None:
        self.env, self.counts_dir = {**env, "BENCH_COUNTS": str(counts)}, counts
        self.running: dict[str, subprocess.Popen] = {}
        self.peaks: dict[str, float] = {}

    def start(self, role: str, *args: str) -> subprocess.Popen:
        module = "adapters.cli" if role == "receiver" else "bench._counted"
        self.running[role] = subprocess.Popen([sys.executable, "-m", module, role, *args], cwd=ROOT, env=self.env)
        return self.running[role]

    async def commands(self) -> dict[int, tuple[str, Counter[str]]]:
        """Per running counted process (by pid): its role and its commands so far, asked for now."""
        found = {}
        for role, process in self.running.items():
            path = self.counts_dir / f"{process.pid}.json"
            if role == "receiver" or not path.exists():  # not counted, or not yet listening for SIGUSR1
                continue
            seq = json.loads(path.read_text())["seq"]
            process.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 20
            while (dump := json.loads(path.read_text()))["seq"] == seq:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {role} did not report its MongoDB commands")
                await asyncio.sleep(0.02)
            found[process.pid] = (role, Counter(dump["counts"]))
        return found

    def note_peak(self, role: str) -> None:
        process = self.running.get(role)
        if process is not None and process.poll() is None:
            self.peaks[role] = max(self.peaks.get(role, 0.0), peak_rss_mb(process.pid))

    def stop(self, role: str) -> None:
        self.note_peak(role)
        process = self.running.pop(role, None)
        if process is not None:
            process.terminate()
            process.wait(timeout=30)


POLLS = ("find", "aggregate")
"""The sweeper's reads: its polls for pending profiles, background like heartbeats. Its writes (claims) are work."""


@dataclass(frozen=True)
class Mark:
    at: float
    requests: int
    commands: dict[int, tuple[str, Counter[str]]]
    store_cpu_s: float


def cpu_s(pid: int) -> float:
    """The user and system CPU seconds process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commands(a: Mark, b: Mark) -> dict[str, Counter[str]]:
    """The commands sent between two marks, by sender: the worker, the sync, the sync's sweeper."""
    found: dict[str, Counter[str]] = {}
    for pid, (role, counts) in b.commands.items():
        before = a.commands.get(pid, (role, Counter()))[1]
        for key, n in counts.items():
            thread, name = key.split(":", 1)
            found.setdefault("sweeper" if thread == "sweeper" else role, Counter())[name] += n - before[key]
    return found


def polls(a: Mark, b: Mark) -> int:
    sweeper = commands(a, b).get("sweeper", Counter())
    return sum(sweeper[name] for name in POLLS)


class Meter:
    """Store requests counted at the server, less the background: the sweeper's polls as counted, and the
    rest (heartbeats, this bench's own requests) as a rate measured while idle."""

    def __init__(self, client: AsyncMongoClient, processes: Processes, store_pid: int) -> None:
        self.client, self.processes, self.store_pid = client, processes, store_pid

    async def mark(self) -> Mark:
        return Mark(time.monotonic(), await server_requests(self.client), await self.processes.commands(), cpu_s(self.store_pid))

    async def idle(self, seconds: float) -> dict[str, float]:
        """While nothing is sent: the requests per second besides the sweeper's polls, those polls, and the
        store's CPU milliseconds per second."""
        a = await self.mark()
        await asyncio.sleep(seconds)
        b = await self.mark()
        return {"other": (b.requests - a.requests - polls(a, b)) / (b.at - a.at), "sweeper_polls": polls(a, b) / (b.at - a.at),
                "store_cpu_ms": (b.store_cpu_s - a.store_cpu_s) * 1000 / (b.at - a.at)}

    @staticmethod
    def background(marks: list[Mark], idle: list[dict[str, float]]) -> float:
        """The requests between the first and the last mark that are background: the sweeper's polls made
        meanwhile, and each interval's idle rate of the rest."""
        return polls(marks[0], marks[-1]) + sum(rate["other"] * (b.at - a.at) for a, b, rate in zip(marks, marks[1:], idle))

    @staticmethod
    def per_event(marks: list[Mark], idle: list[dict[str, float]], events: int) -> dict[str, Any]:
        """Per event between the first and the last mark: the requests less the background, that
        background, the commands by sender, and what the server counted that no sender did."""
        a, b = marks[0], marks[-1]
        background, sent, n = Meter.background(marks, idle), commands(a, b), max(events, 1)
        counted = sum(sum(counts.values()) for counts in sent.values())
        return {"ops": round((b.requests - a.requests - background) / n, 3), "background": round(background / n, 3),
                "by_sender": {who: {name: round(c / n, 3) for name, c in sorted(counts.items()) if c} for who, counts in sorted(sent.items())},
                "unattributed": round((b.requests - a.requests - (background - polls(a, b)) - counted) / n, 3)}


async def quiet(amqp: str, prefix: str, timeout: float = 300.0, settle: float = 3.0) -> None:
    """Until no message waits in the pipeline's queues (the delay queues too; dead letters aside), then
    ``settle`` for those the workers hold: the syncs still queued once the ESPs hold every change (they
    find nothing left to send) are the events' work too, and would land in the next measurement."""
    deadline, clear = time.monotonic() + timeout, 0
    while clear < 2 and time.monotonic() < deadline:
        depths = await asyncio.to_thread(admin.queue_depths, amqp, prefix)
        clear = clear + 1 if not any(n for name, n in depths.items() if not name.endswith(".XQ")) else 0
        await asyncio.sleep(0.5)
    await asyncio.sleep(settle)


async def drained(client: AsyncMongoClient, database: str, esps: list[str], timeout: float = 300.0) -> None:
    """Until no profile waits for any ESP target: a sync still holding prefetched messages after a step
    that failed shows no queue depth, and its work would count as the next measurement's background."""
    deadline = time.monotonic() + timeout
    waiting = {"$or": [{f"esp.{esp}.pending": True} for esp in esps]}
    while await client[database].profiles.find_one(waiting, {"_id": 1}) is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.5)


async def step(bench: Bench, meter: Meter, rate: float, events: int, emails: list[str], idle: dict[str, float],
               timeout: float, settled: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    """One steady rate on profiles of its own: sent, waited out until every ESP holds the final
    versions, then until the pipeline is quiet (``settled``), its store requests counted throughout."""
    bench.accepted = []
    start = await meter.mark()
    sent_rate = await bench.paced(emails, events, rate)
    done = await bench.wait_for(bench.final(emails), timeout=timeout)
    held = await meter.mark()
    await settled()
    end = await meter.mark()
    accepted = len(bench.accepted)
    result: dict[str, Any] = {"rate_per_s": rate, "events": events, "profiles": len(emails), "accepted": accepted,
                              "sent_per_s": round(sent_rate, 1)}
    passed = accepted == events and sent_rate >= 0.9 * rate and len(done) == len(bench.sandboxes)
    for esp in bench.sandboxes:
        latencies = await bench.latencies(esp)
        p50, p99 = quantiles(latencies)
        result[esp] = {"p50_s": p50, "p99_s": p99, "delivered": len(latencies)}
        passed = passed and len(latencies) == accepted and p99 <= P99_BAR_S
    used = Meter.per_event([start, end], [idle], accepted)
    result["store_ops_per_event"] = used["ops"]
    result["store_ops_per_event_until_held"] = Meter.per_event([start, held], [idle], accepted)["ops"]
    result["store_background_per_event"] = used["background"]
    result["store_commands_per_event"] = used["by_sender"]
    result["store_unattributed_per_event"] = used["unattributed"]
    result["store_cpu_ms_per_event"] = round((end.store_cpu_s - start.store_cpu_s) * 1000 / max(accepted, 1), 2)
    result["passed"] = passed
    return result


def failure(step: dict[str, Any], esps: list[str]) -> str:
    """Why a step did not pass, in words."""
    if step["accepted"] < step["events"]:
        return f"{step['accepted']} of {step['events']} events accepted"
    if step["sent_per_s"] < 0.9 * step["rate_per_s"]:
        return f"this client sent only {step['sent_per_s']}/s"
    late = [esp for esp in esps if step[esp]["delivered"] < step["accepted"]]
    if late:
        return f"not every event reached {', '.join(late)} in time"
    return "p99 above 1 s at " + ", ".join(esp for esp in esps if step[esp]["p99_s"] > P99_BAR_S)


def environment(prefix: str, uri: str, ports: dict[str, int]) -> dict[str, str]:
    """The pipeline's environment: this run's queues, database and sandboxes; a short grace and sweep interval."""
    env = {**os.environ, "MERGETAG_QUEUE_PREFIX": prefix, "MERGETAG_MONGODB_URI": uri, "MERGETAG_MONGODB_DATABASE": prefix,
           "MERGETAG_SHOPIFY_SECRETS": SECRET, "MERGETAG_MAILCHIMP_API_KEY": KEY, "MERGETAG_MAILCHIMP_LIST_ID": "sandbox",
           "MERGETAG_KLAVIYO_API_KEY": klaviyo_sandbox.DEFAULT_KEY, "MERGETAG_SENDGRID_API_KEY": sendgrid_sandbox.DEFAULT_KEY,
           "MERGETAG_LOG_LEVEL": os.environ.get("MERGETAG_LOG_LEVEL", "WARNING"),
           "MERGETAG_ESPS": ",".join(ports),
           **{f"MERGETAG_{esp.upper()}_BASE_URL": f"http://127.0.0.1:{port}" + ("/3.0" if esp == "mailchimp" else "")
              for esp, port in ports.items()},
           "MERGETAG_SYNC_GRACE_S": "2", "MERGETAG_SYNC_SWEEP_INTERVAL_S": "0.5",
           "MERGETAG_IDENTITY_HASH_KEYS": os.environ.get("MERGETAG_IDENTITY_HASH_KEYS", "bench-identity-hash-key-0123456789")}
    env.pop("MERGETAG_ESP_FILE", None)
    return env


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--profiles", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10.0, help="events per second in the steady phase")
    parser.add_argument("--step-start", type=float, default=5.0, help="the first step's rate (events/s); each next one doubles it")
    parser.add_argument("--step-events", type=int, default=300, help="events per step")
    parser.add_argument("--step-profiles", type=int, default=100, help="new profiles per step")
    parser.add_argument("--step-max-rate", type=float, default=1280.0, help="no step above this rate")
    parser.add_argument("--step-timeout", type=float, default=120.0, help="longest wait for a step's final versions at every ESP")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of each idle interval measuring the background")
    parser.add_argument("--store-docs", type=int, default=10_000, help="upserts measuring the store's own rate")
    parser.add_argument("--store-batch", type=int, default=500)
    parser.add_argument("--store-upserts-per-id", type=int, default=10)
    parser.add_argument("--backlog", type=int, default=1000, help="profiles changed while the worker and the sync are down")
    parser.add_argument("--backlog-timeout", type=float, default=300.0, help="longest wait for the merges, then for every ESP")
    parser.add_argument("--esps", default="mailchimp,klaviyo,sendgrid", help="the ESP targets to sync to")
    parser.add_argument("--cluster", action="store_true", help="on a three-node RabbitMQ cluster of the benchmark's own (quorum queues replicated)")
    args = parser.parse_args()
    if args.cluster:
        start_cluster()  # its nodes become MERGETAG_AMQP_URL, which every process of the run inherits

    began = time.monotonic()
    prefix = "sbench" + uuid.uuid4().hex[:6]
    mongo, uri = start_secantus()
    esps = args.esps.split(",")
    ports = {esp: free_port() for esp in esps}
    receiver_port = free_port()
    env = environment(prefix, uri, ports)
    amqp = env.get("MERGETAG_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    sandboxes = []
    for esp, port in ports.items():
        extra = ["--api-key", KEY] if esp == "mailchimp" else []
        sandboxes.append(subprocess.Popen([sys.executable, "-m", f"sandboxes.{esp}", "--port", str(port), *extra], cwd=ROOT, env=env,
                                          stdout=subprocess.DEVNULL))
        wait_for_port(port, process=sandboxes[-1])
    pipeline = Processes(env, Path(tempfile.mkdtemp(prefix=f"{prefix}-counts-")))
    pipeline.start("worker")
    wait_for_port(receiver_port, process=pipeline.start("receiver", "--port", str(receiver_port)))
    pipeline.start("sync")
    meter = Meter(AsyncMongoClient(uri), pipeline, mongo.pid)
    result: dict[str, Any] = {}

    async def settled() -> None:
        await quiet(amqp, prefix, timeout=args.step_timeout)

    try:
        await asyncio.sleep(2)  # workers attach to their queues
        async with aiohttp.ClientSession() as http:
            bench = Bench(http, f"http://127.0.0.1:{receiver_port}", {esp: f"http://127.0.0.1:{p}" for esp, p in ports.items()})

            # Steady: a rate the sync keeps up with, measured from each 202 to each ESP.
            emails = [f"s{n}-{prefix}@example.com" for n in range(args.profiles)]
            await bench.paced(emails, args.events, args.rate)
            await bench.wait_for(bench.final(emails), timeout=180)
            steady: dict[str, Any] = {"events": args.events, "profiles": args.profiles, "rate_per_s": args.rate,
                                      "accepted": len(bench.accepted)}
            for esp in ports:
                latencies = await bench.latencies(esp)
                p50, p99 = quantiles(latencies)
                steady[esp] = {"write_requests": await bench.requests(esp), "delivered": len(latencies),
                               "latency_p50_s": p50, "latency_p99_s": p99}
            result["steady"] = steady

            # Steps: doubling rates until one misses the bar, each from a quiet pipeline.
            await settled()
            idle_live = await meter.idle(args.idle)
            steps: list[dict[str, Any]] = []
            rate, note = args.step_start, None
            while rate <= args.step_max_rate:
                emails = [f"r{len(steps)}-{n}-{prefix}@example.com" for n in range(args.step_profiles)]
                steps.append(await step(bench, meter, rate, args.step_events, emails, idle_live, args.step_timeout, settled))
                if not steps[-1]["passed"]:
                    note = f"stopped at {rate:g}/s: {failure(steps[-1], esps)}"
                    break
                rate *= 2
            passed = [s["rate_per_s"] for s in steps if s["passed"]]
            result["steps"] = steps
            result["max_rate_p99_under_1s"] = max(passed, default=0)
            if not passed:
                note = f"even the first step ({args.step_start:g}/s) failed: {failure(steps[0], esps)}"
            elif note is None:
                note = f"every step up to --step-max-rate passed: {max(passed):g}/s is a lower bound"
            result["note"] = note
            result["store_ops_per_event_live"] = steps[0]["store_ops_per_event"]
            result["store_cpu_ms_per_s_idle"] = round(idle_live["store_cpu_ms"], 1)

            # The backlog's backgrounds (both up, then the worker alone), then both down; the store's own rate while all is quiet.
            await drained(meter.client, prefix, esps, timeout=args.step_timeout)
            await settled()
            idle_both = await meter.idle(args.idle)
            pipeline.stop("sync")
            idle_worker = await meter.idle(args.idle)
            pipeline.stop("worker")
            result["idle_requests_per_s"] = {name: {kind: round(rate, 2) for kind, rate in idle.items() if kind != "store_cpu_ms"} for name, idle in
                                             (("live", idle_live), ("backlog_worker", idle_worker), ("backlog_worker_and_sync", idle_both))}
            cpu_before = cpu_s(mongo.pid)
            store_bulk, result["merge_batch_max"] = await store_rate(env, args)
            result["store_bulk_upserts_per_s"] = round(store_bulk, 1)
            result["store_cpu_ms_per_bulk_upsert"] = round((cpu_s(mongo.pid) - cpu_before) * 1000 / args.store_docs, 3)
            result["ratio_to_store_bulk"] = round(result["max_rate_p99_under_1s"] / store_bulk, 3)

            # Backlog: the events wait in RabbitMQ; the worker merges them all, then the sync starts.
            for esp in ports:
                await bench.control(esp, "stats/reset", {})
            backlog = [f"b{n}-{prefix}@example.com" for n in range(args.backlog)]
            bench.accepted = []
            for start_at in range(0, len(backlog), 50):
                await asyncio.gather(*(bench.send(e, 1) for e in backlog[start_at:start_at + 50]))
            worker_at = await meter.mark()
            pipeline.start("worker")
            deadline = time.monotonic() + args.backlog_timeout
            while (await asyncio.to_thread(admin.queue_depths, amqp, prefix)).get(f"{prefix}.events", 0) and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)  # the last merges finish
            restarted, sync_at = time.time(), await meter.mark()
            pipeline.start("sync")
            done = await bench.wait_for({e: 1 for e in backlog}, timeout=args.backlog_timeout)
            held = await meter.mark()
            result["backlog"] = {"profiles": len(backlog), "accepted": len(bench.accepted), **{
                esp: {"write_requests": await bench.requests(esp), "minimum_requests": math.ceil(len(backlog) / descriptor(esp).batch_limit),
                      "drain_s": round(done[esp] - restarted, 1) if esp in done else None}
                for esp in ports}}
            await quiet(amqp, prefix, timeout=args.backlog_timeout)
            end, events = await meter.mark(), len(bench.accepted)
            used = Meter.per_event([worker_at, sync_at, end], [idle_worker, idle_both], events)
            result["store_ops_per_event_backlog"] = used["ops"]
            result["store_ops_per_event_backlog_until_held"] = Meter.per_event([worker_at, sync_at, held], [idle_worker, idle_both], events)["ops"]
            result["store_ops_per_event_backlog_by_stage"] = {"merge": Meter.per_event([worker_at, sync_at], [idle_worker], events)["ops"],
                                                              "sync": Meter.per_event([sync_at, end], [idle_both], events)["ops"]}
            result["store_background_per_event_backlog"] = used["background"]
            result["store_commands_per_event_backlog"] = used["by_sender"]
            result["store_unattributed_per_event_backlog"] = used["unattributed"]
        for role in ("receiver", "worker", "sync"):
            pipeline.note_peak(role)
        result["peak_rss_mb"] = {role: pipeline.peaks.get(role) for role in ("receiver", "worker", "sync")}
        result["bench_s"] = round(time.monotonic() - began, 1)
    finally:
        await meter.client.close()
        for role in ("sync", "receiver", "worker"):
            pipeline.stop(role)
        for p in sandboxes:
            p.terminate()
        for p in sandboxes:
            p.wait(timeout=20)
        mongo.terminate()
        mongo.wait(timeout=20)
        shutil.rmtree(pipeline.counts_dir, ignore_errors=True)
        admin.drop_queues(amqp, prefix)
    print(json.dumps(result))


async def store_rate(env: dict[str, str], args: argparse.Namespace) -> tuple[float, int]:
    """The store's own bulk-upsert rate with a merged profile of this run (and its members, as a worker
    in this environment builds them); and the worker's merge batch setting in that environment."""
    from workers.runtime import close_runtime, create_runtime

    os.environ.clear()
    os.environ.update(env)
    rt = await create_runtime(Settings())
    try:
        doc = await rt.store.profiles.find_one({"merged_into": {"$exists": False}, "erased": None}, {"_id": 1})
        profile, _ = await rt.store.load(doc["_id"])
        distinct = max(1, args.store_docs // args.store_upserts_per_id)
        rate = await bulk_upserts(rt.store, args.store_docs, args.store_batch, profile, rt.members(profile), distinct=distinct)
        return rate, rt.settings.merge_batch_max
    finally:
        await close_runtime(rt)


if __name__ == "__main__":
    asyncio.run(main())
