"""What a backfill (``mergetag pull … --wait``) reports, computed from readings; no I/O here.

The pull is tallied per resource as its pages are confirmed into the queue. With ``--wait`` the
command then reads the pipeline until it looks idle, and sets what it cost against what it did:
the store's requests per event published, and per ESP account the write requests the sync made
against the fewest that could have carried the profiles it sent, ceil(profiles / batch size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Requests that only read: job polls, lookups. Every other method counts as a write.
READS = frozenset({"GET", "HEAD"})


def per_second(count: float, seconds: float) -> float | None:
    """A rate for display; None before any time has passed."""
    return round(count / seconds, 1) if seconds > 0 else None


@dataclass
class Tally:
    """Records and pages pulled per resource, with when each resource's pull began and ended
    (monotonic seconds), so rates are per resource and the summary's elapsed is the whole pull's."""

    started: float
    records: dict[str, int] = field(default_factory=dict)
    pages: dict[str, int] = field(default_factory=dict)
    began: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)

    def begin(self, resource: str, now: float) -> None:
        self.began[resource] = now
        self.records.setdefault(resource, 0)
        self.pages.setdefault(resource, 0)

    def add(self, resource: str, records: int) -> None:
        """One page confirmed into the queue: every record in it became one published event."""
        self.records[resource] = self.records.get(resource, 0) + records
        self.pages[resource] = self.pages.get(resource, 0) + 1

    def end(self, resource: str, now: float) -> None:
        self.ended[resource] = now

    def rate(self, resource: str, now: float) -> float | None:
        """Records per second of ``resource`` so far (or over its whole pull, once ended)."""
        began = self.began.get(resource, self.started)
        return per_second(self.records.get(resource, 0), self.ended.get(resource, now) - began)

    @property
    def total(self) -> int:
        return sum(self.records.values())

    def line(self, resource: str, now: float) -> str:
        """One plain progress line, for logs that are not a terminal."""
        rate = self.rate(resource, now)
        return (f"{resource}: {self.records.get(resource, 0):,} records, {self.pages.get(resource, 0)} pages"
                + (f", {rate:,.1f}/s" if rate is not None else ""))


@dataclass
class Quiet:
    """Decides when the pipeline is done: idle (nothing queued, nothing pending) at every reading for
    ``settle`` seconds in a row. The wait covers what no reading shows: messages a worker holds
    while it merges them or waits out a retry are not counted by the queue."""

    settle: float
    since: float | None = None

    def observe(self, idle: bool, now: float) -> bool:
        """Record one reading; True once idle has held for ``settle`` seconds. :attr:`since` is when it
        first looked idle: the moment the work was done, the settle time aside."""
        if not idle:
            self.since = None
            return False
        if self.since is None:
            self.since = now
        return now - self.since >= self.settle


def still_merging(queued: Mapping[str, int], events_queue: str) -> bool:
    """Whether events wait to be merged: messages ready in the events queue or its delay queue
    (``<queue>.DQ``; its dead letters, ``.XQ``, wait for an operator, not for the pipeline)."""
    return any(n for name, n in queued.items() if name in (events_queue, f"{events_queue}.DQ"))


def pull_summary(tally: Tally, now: float, checkpoints: Mapping[str, str]) -> dict[str, Any]:
    """Records and pages per resource, events published, elapsed and events per second of the pull."""
    elapsed = max(tally.ended.values(), default=now) - tally.started
    return {
        "resources": {r: {"records": tally.records[r], "pages": tally.pages[r], "records_per_s": tally.rate(r, now),
                          "checkpoint": checkpoints.get(r)} for r in tally.records},
        "records": tally.total,
        "pages": sum(tally.pages.values()),
        "events_published": tally.total,
        "elapsed_s": round(elapsed, 2),
        "events_per_s": per_second(tally.total, elapsed),
    }


def store_requests(before: int | None, after: int | None, own: int, events: int) -> dict[str, Any]:
    """The store's requests between two readings, less those of this command's own readings, per event.

    ``before``/``after`` None: the server did not say (no ``serverStatus`` right).
    """
    if before is None or after is None:
        return {"requests": None, "per_event": None}
    requests = max(0, after - before - own)
    return {"requests": requests, "per_event": round(requests / events, 3) if events else None}


def esp_requests(accounts: Mapping[str, str], batch_limits: Mapping[str, int], synced: Mapping[str, int],
                 before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """Per ESP account, the requests the sync made against the minimum.

    Parameters:
      accounts: target -> its account (targets sharing an API key share one count, so they are
        reported together, under their names joined with ``+``).
      batch_limits: target -> most members per bulk request.
      synced: target -> profiles sent a member since the start.
      before, after: account -> requests per kind, read at the start and at the end.
    """
    grouped: dict[str, list[str]] = {}
    for target in sorted(accounts):
        grouped.setdefault(accounts[target], []).append(target)
    report = {}
    for account, targets in grouped.items():
        counts = {kind: n - before.get(account, {}).get(kind, 0) for kind, n in after.get(account, {}).items()}
        counts = {kind: n for kind, n in sorted(counts.items()) if n}
        writes = sum(n for kind, n in counts.items() if kind not in READS)
        minimum = sum(math.ceil(synced[t] / batch_limits[t]) for t in targets)
        report["+".join(targets)] = {
            "profiles_synced": sum(synced[t] for t in targets),
            "batch_limit": min(batch_limits[t] for t in targets),
            "minimum_requests": minimum,
            "write_requests": writes,
            "writes_per_minimum": round(writes / minimum, 2) if minimum else None,
            "requests": counts,
        }
    return report


def render(summary: Mapping[str, Any]) -> list[str]:
    """The summary as lines for a person (``--json`` prints it as one JSON object instead)."""
    lines = [f"{r}: {v['records']:,} records in {v['pages']} pages" + (f" ({v['records_per_s']:,.1f}/s)" if v["records_per_s"] else "")
             for r, v in summary["resources"].items()]
    rate = summary["events_per_s"]
    lines.append(f"published {summary['events_published']:,} events in {summary['elapsed_s']:.1f} s"
                 + (f" ({rate:,.1f} events/s)" if rate else ""))
    wait = summary.get("wait")
    if wait is None:
        return lines
    state = "merged and synced" if wait["drained"] else f"NOT drained by the deadline (pending: {wait['pending']})"
    rate = wait["events_per_s"]
    lines.append(f"{state} after {wait['elapsed_s']:.1f} s" + (f" ({rate:,.1f} events/s end to end)" if rate else ""))
    store = wait["store"]
    if store["per_event"] is not None:
        lines.append(f"store: {store['requests']:,} requests, {store['per_event']:.2f} per event")
    for name, esp in wait["esp"].items():
        lines.append(f"{name}: {esp['profiles_synced']:,} profiles synced, {esp['write_requests']:,} write requests"
                     f" (minimum {esp['minimum_requests']:,} at {esp['batch_limit']} per request)")
    if any(wait["dead_letters"].values()):
        lines.append(f"dead letters: {wait['dead_letters']}")
    return lines
