"""Replays at a chosen rate, run by the admin process in the background: progress, cancel, audit."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from adapters.store.audit import AuditLog
from broker.dead_letters import DeadLetters

log = logging.getLogger(__name__)


@dataclass
class ReplayJob:
    id: str
    token: str
    total: int
    rate: float
    done: int = 0
    status: str = "running"
    """running, finished, cancelled or failed."""
    cancel: asyncio.Event = field(default_factory=asyncio.Event)


class Replays:
    """Replays of this admin process (a page polls one by id)."""

    def __init__(self, tools: DeadLetters, audit: AuditLog) -> None:
        self._tools = tools
        self._audit = audit
        self.jobs: dict[str, ReplayJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, ids: list[str], rate: float, token: str, selection: dict[str, Any]) -> ReplayJob:
        """Replay the dead letters ``ids`` at about ``rate`` per second, recorded in the audit log."""
        job = ReplayJob(uuid.uuid4().hex[:12], token, len(ids), rate)
        self.jobs[job.id] = job
        entry = await self._audit.record(token, "dead_letters.replay", {**selection, "rate": rate}, {"selected": len(ids)}, "started")
        task = asyncio.get_running_loop().create_task(self._run(job, ids, entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: ReplayJob, ids: list[str], entry: str) -> None:
        step = max(1, int(job.rate))
        try:
            for i in range(0, len(ids), step):
                if job.cancel.is_set():
                    job.status = "cancelled"
                    break
                started = time.monotonic()
                job.done += len(await asyncio.to_thread(self._tools.replay, message_ids=set(ids[i:i + step])))
                await asyncio.sleep(max(0.0, step / job.rate - (time.monotonic() - started)))
            else:
                job.status = "finished"
        except Exception:
            job.status = "failed"
            log.exception("replay %s failed after %d of %d", job.id, job.done, job.total)
        await self._audit.update(entry, {"selected": job.total, "replayed": job.done}, job.status)

    async def close(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
