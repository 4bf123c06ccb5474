"""Replays and redrives at a chosen rate, run by the admin process in the background: progress,
cancel, audit. A dead-letter replay and a quarantine redrive are the same job over a different step."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from adapters.pacing import at_rate
from adapters.store.audit import AuditLog

log = logging.getLogger(__name__)

Step = Callable[[list[str]], Awaitable[int]]


@dataclass
class ReplayJob:
    id: str
    token: str
    total: int
    rate: float
    kind: str = "dead_letters"
    """dead_letters or quarantine: what is replayed (and where the page leads back to)."""
    done: int = 0
    status: str = "running"
    """running, finished, cancelled or failed."""
    cancel: asyncio.Event = field(default_factory=asyncio.Event)


class Replays:
    """Replays of this admin process (a page polls one by id)."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit
        self.jobs: dict[str, ReplayJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, kind: str, ids: list[str], rate: float, token: str, selection: dict[str, Any], step: Step) -> ReplayJob:
        """Run ``step`` over ``ids`` (dead letters, quarantined deliveries) at about ``rate`` per second,
        recorded in the audit log as ``<kind>.replay`` / ``quarantine.redrive``."""
        job = ReplayJob(uuid.uuid4().hex[:12], token, len(ids), rate, kind)
        self.jobs[job.id] = job
        action = "quarantine.redrive" if kind == "quarantine" else "dead_letters.replay"
        entry = await self._audit.record(token, action, {**selection, "rate": rate}, {"selected": len(ids)}, "started")
        task = asyncio.get_running_loop().create_task(self._run(job, ids, entry, step))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: ReplayJob, ids: list[str], entry: str, step: Step) -> None:
        def progress(done: int) -> None:
            job.done = done

        try:
            _, finished = await at_rate(ids, job.rate, step, job.cancel.is_set, progress)
            job.status = "finished" if finished else "cancelled"
        except Exception:
            job.status = "failed"
            log.exception("replay %s failed after %d of %d", job.id, job.done, job.total)
        await self._audit.update(entry, {"selected": job.total, "replayed": job.done}, job.status)

    async def close(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
