"""The sync's actors: thin. They route each message to the sender (``sender.py``), which the policy
(``policy.py``) steers; this module only declares them on a broker and puts work back on the queue.

- ``sync_profile``: one profile to the ESP targets a change gave it (one message for them all),
  coalesced per window, in a round with the other syncs in flight (``rounds.py``); ``alone`` when the
  sweeper or a refused batch sends it, ``retry_refused`` for a replayed dead letter (both to one target).
- ``sync_urgent``: the same for consent changes and erasures, on the urgent queue, ahead of any backlog.
- ``sync_batch``: a backlog to one target in one bulk request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import dramatiq

from broker import topology
from broker.middleware import as_dead_letter
from schemas.errors import EspRejected
from schemas.sync import Expected
from workers.runtime import Runtime
from workers.sync import sender
from workers.sync.rounds import SyncRounds

log = logging.getLogger(__name__)

GetRuntime = Callable[[], Awaitable[Runtime]]


@dataclass(frozen=True)
class SyncActors:
    broker: dramatiq.Broker
    queue: str
    sync_profile: dramatiq.Actor
    sync_urgent: dramatiq.Actor
    sync_batch: dramatiq.Actor

    async def schedule(self, rt: Runtime, profile_id: str, targets: list[str], urgent: bool = False,
                       handed: dict[str, Expected] | None = None) -> None:
        """One delayed sync per profile and ESP target per coalescing window (one message for the targets of a
        change); it sends whatever the profile is by then. Consent changes and erasures are urgent: they skip
        the window and jump the queue. ``handed``: the members the merge wrote, carried in the message so the
        sync need not read them back (where a later change replaced one, the sync reads after all)."""
        if urgent:
            for esp in targets:
                await asyncio.to_thread(self.sync_urgent.send, profile_id, esp)
            return
        first = await rt.coalescer.first_in_window(targets, profile_id)
        if first:
            expect = {esp: hint.to_message() for esp, hint in (handed or {}).items() if esp in first}
            await asyncio.to_thread(self.sync_profile.send_with_options, args=(profile_id, first[0] if len(first) == 1 else first),
                                    kwargs={"expect": expect} if expect else None, delay=rt.coalescer.window_ms or None)

    async def retry(self, profile_id: str, esp: str, delay_ms: int) -> None:
        """Try one target of a sync again on its own (with its own retries, and its own dead letter at their end)."""
        await asyncio.to_thread(self.sync_profile.send_with_options, args=(profile_id, esp), delay=delay_ms)

    async def alone(self, profile_ids: list[str], esp: str) -> None:
        for pid in profile_ids:
            await asyncio.to_thread(self.sync_profile.send_with_options, args=(pid, esp), kwargs={"alone": True})

    async def read_back(self, profile_id: str, esp: str, delay_ms: int) -> None:
        await asyncio.to_thread(self.sync_urgent.send_with_options, args=(profile_id, esp), delay=delay_ms)

    async def refused(self, profile_id: str, esp: str, reason: str) -> None:
        single = dramatiq.Message(queue_name=self.queue, actor_name=topology.SYNC_PROFILE_ACTOR, args=(profile_id, esp),
                                  kwargs={"alone": True}, options={})
        letter = as_dead_letter(single, {"code": EspRejected.code, "detail": reason, "retryable": False, "exception": EspRejected.__name__})
        await asyncio.to_thread(self.broker.enqueue, letter)


def declare(broker: dramatiq.Broker, runtime: GetRuntime, prefix: str) -> SyncActors:
    """The sync actors on ``broker``, each fetching the process's runtime when it runs."""
    queue = topology.sync_queue(prefix)
    actors: list[SyncActors] = []
    rounds: dict[int, SyncRounds] = {}

    def round_of(rt: Runtime) -> SyncRounds | None:
        """The process's sync rounds (one per runtime, made in its event loop); None when turned off."""
        if rt.settings.sync_round_max <= 0:
            return None
        if id(rt) not in rounds:
            rounds[id(rt)] = SyncRounds(rt, actors[0], rt.settings.sync_round_max, rt.settings.sync_round_window_ms / 1000,
                                        rt.settings.sync_lane_gap_ms / 1000, rt.settings.sync_record_carry_ms / 1000,
                                        rt.settings.sync_note_carry_ms / 1000)
        return rounds[id(rt)]

    async def sync_profile(profile_id: str, esp: str | list[str], alone: bool = False, retry_refused: bool = False,
                           expect: dict[str, list[Any]] | None = None) -> None:
        """Parameters:
          esp: the ESP target, or several (those of one change: they share a round, so one claim and one record).
          alone: send it now even in a backlog (sent by the sweeper, or split out of a refused batch).
          retry_refused: send it even if the ESP refused this very member before (a replayed dead letter).
          expect: per target, the member the merge wrote, its hash and when ([member, hash, ISO time]).
        """
        rt = await runtime()
        targets = [esp] if isinstance(esp, str) else esp
        hints = {t: Expected.from_message(carried) for t, carried in (expect or {}).items()}
        if not (alone or retry_refused):
            await rt.coalescer.started(targets, profile_id)  # scheduled by a change: the next change schedules another
        if len(targets) == 1:
            await sender.sync(rt, actors[0], profile_id, targets[0], alone=alone, retry_refused=retry_refused, rounds=round_of(rt),
                              expect=hints.get(targets[0]))
            return
        outcomes = await asyncio.gather(*(sender.sync(rt, actors[0], profile_id, t, rounds=round_of(rt), expect=hints.get(t)) for t in targets),
                                        return_exceptions=True)
        # A target that failed goes on alone, so that only it is retried and only it is dead-lettered.
        for failed, exc in ((t, e) for t, e in zip(targets, outcomes, strict=True) if isinstance(e, BaseException)):
            if isinstance(exc, EspRejected):
                await actors[0].refused(profile_id, failed, exc.detail)
            elif isinstance(exc, Exception):
                log.warning("sync of %s to %s failed (%s); retried on its own", profile_id, failed, type(exc).__name__)
                await actors[0].retry(profile_id, failed, rt.settings.retry_min_backoff_ms)
            else:
                raise exc

    async def sync_urgent(profile_id: str, esp: str) -> None:
        """On a queue of its own (no backlog ahead of it in RabbitMQ), and first in the worker's own queue (actor priority)."""
        await sender.sync(await runtime(), actors[0], profile_id, esp, urgent=True)

    async def sync_batch(profile_ids: list[str], esp: str) -> None:
        await sender.send_batch(await runtime(), actors[0], profile_ids, esp)

    declared = SyncActors(
        broker=broker,
        queue=queue,
        sync_profile=dramatiq.actor(sync_profile, broker=broker, actor_name=topology.SYNC_PROFILE_ACTOR, queue_name=queue, priority=10),
        sync_urgent=dramatiq.actor(sync_urgent, broker=broker, actor_name=topology.SYNC_URGENT_ACTOR,
                                   queue_name=topology.urgent_queue(prefix), priority=0),
        sync_batch=dramatiq.actor(sync_batch, broker=broker, actor_name=topology.SYNC_BATCH_ACTOR, queue_name=queue),
    )
    actors.append(declared)
    return declared
