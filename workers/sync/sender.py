"""The sender: what one sync does at the ESP and records in the outbox, for one profile or a batch.

Every write after a claim names the lease's token, so a send that outlived its lease cannot
overwrite what the next holder records. What goes back to the queue (members split out of a batch,
a later read-back, a refused member's dead letter) goes through :class:`Requeue`, so this module
knows no broker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, Protocol

from adapters.esps.base import Esp
from adapters.esps.guard import rate_patience
from schemas.errors import CircuitOpen, EspRejected, MergetagError, SyncBusy
from schemas.sync import Expected, SyncState
from workers.runtime import Runtime
from workers.sync import policy

log = logging.getLogger(__name__)


class Round(Protocol):
    async def sync(self, profile_id: str, esp: str, expect: Expected | None = None) -> None:
        """Send the profile's member to ``esp`` together with the other syncs in flight (``expect``: what the merge wrote)."""


class Requeue(Protocol):
    async def alone(self, profile_ids: list[str], esp: str) -> None:
        """Send each profile on its own, now."""

    async def read_back(self, profile_id: str, esp: str, delay_ms: int) -> None:
        """Look again, urgently, after ``delay_ms``, whether the ESP still holds an erased contact."""

    async def refused(self, profile_id: str, esp: str, reason: str) -> None:
        """Dead-letter one member the ESP refused in a batch, replayable on its own."""


def target(rt: Runtime, esp: str) -> Esp | None:
    client = rt.esps.get(esp)
    if client is None:
        # The target was removed from the configuration since this sync was scheduled: nothing to send it to.
        log.warning("sync for ESP target %s skipped: not configured", esp)
    return client


@asynccontextmanager
async def _released_if_it_fails(rt: Runtime, esp: str, token: str, profile_ids: list[str], lease: timedelta) -> AsyncIterator[None]:
    """Around a stretch of a send with nothing of it in flight at the ESP (before its request, or once the ESP
    answered): when the store or the broker fails there, the send's leases are released as soon as the store
    answers again, so the message's retry and the sweeper can send; no other send knows their token."""
    try:
        yield
    except MergetagError:
        raise
    except Exception:
        await rt.store.outbox.release_lost(profile_ids, esp, token, lease)
        raise


async def send_batch(rt: Runtime, requeue: Requeue, profile_ids: list[str], esp: str) -> None:
    """Send a backlog to one target in one bulk request (an asynchronous job is polled to its end
    first); each refused member is recorded and dead-lettered on its own, the rest recorded as sent."""
    client = target(rt, esp)
    if client is None:
        return
    lease = rt.batch_leases[esp]
    started = time.perf_counter()
    claimed, token = await rt.store.outbox.claim_sends(profile_ids, esp, lease)
    batch = policy.plan_batch(claimed)
    async with _released_if_it_fails(rt, esp, token, list(claimed), lease):
        # Address work goes alone, free to claim: it must not wait for this batch's lease.
        await rt.store.outbox.settle_many(esp, token, [], [], [*batch.idle, *batch.alone])
        await requeue.alone(batch.alone, esp)
    todo = batch.sent
    if not todo:
        return
    jobs: list[str] = []

    async def accepted(job_id: str) -> None:
        jobs.append(job_id)
        await rt.store.outbox.note_job(esp, token, job_id, list(todo))

    try:
        refused = await client.upsert_batch([state.member for state in todo.values()], accepted)
    except MergetagError as exc:
        if exc.may_still_land:
            raise  # the job may still run: the leases run out by themselves, nothing overtakes it
        async with _released_if_it_fails(rt, esp, token, list(todo), lease):
            await rt.store.outbox.settle_many(esp, token, [], [], list(todo))
        if isinstance(exc, CircuitOpen):
            await rt.store.outbox.park(list(todo), esp)
            log.info("batch of %d for %s parked: its circuit is open", len(todo), esp)
            return
        if isinstance(exc, EspRejected):
            # The ESP refused the whole request, perhaps for one member: each goes alone, so only the
            # bad one is refused and dead-lettered and the good ones are not held hostage.
            log.warning("batch of %d refused by %s (%s); sending them one by one", len(todo), esp, exc.code)
            await requeue.alone(list(todo), esp)
            return
        raise
    sent, failed = [], []
    async with _released_if_it_fails(rt, esp, token, list(todo), lease):
        for pid, state in todo.items():
            reason = refused.get(client.key(state.member))
            if reason is None:
                sent.append((pid, state.member_hash))
            else:
                failed.append((pid, state.member_hash, EspRejected.code))
                await requeue.refused(pid, esp, reason)
        await rt.store.outbox.settle_many(esp, token, sent, failed, batch.idle, jobs)
    count_sent(rt, esp, [todo[pid] for pid, _ in sent], "batch", started, [pid for pid, _ in sent])
    log.info("batch of %d synced to %s: %d sent, %d refused", len(todo), esp, len(sent), len(failed))


def count_sent(rt: Runtime, esp: str, states: list[SyncState], kind: str, started: float, ids: list[str],
               accepted_at: datetime | None = None) -> None:
    """The metrics of a send the ESP accepted (its duration, each member's freshness from the merge
    that changed it to ``accepted_at``, default now) and its entry in each profile's trail."""
    now = accepted_at or datetime.now(timezone.utc)
    if rt.trail is not None:
        for profile_id in ids:
            rt.trail.add([f"profile:{profile_id}"], "synced", profile=profile_id, target=esp, request=kind, status="accepted")
    rt.metrics.sync_seconds.labels(esp, kind).observe(time.perf_counter() - started)
    rt.metrics.synced.labels(esp).inc(len(states))
    freshness = rt.metrics.freshness.labels(esp)
    for state in states:
        if state.dirty_at is not None:
            freshness.observe(max(0.0, (now - state.dirty_at).total_seconds()))


async def _calls(rt: Runtime, profile_id: str, esp: str, token: str, calls: list[Callable[[], Awaitable[Any]]]) -> None:
    """Run ESP calls in order; on failure end the send lease, unless a timed-out call may still land
    (then the lease runs out by itself, so no other send overtakes it)."""
    try:
        for call in calls:
            await call()
    except MergetagError as exc:
        if not exc.may_still_land and not isinstance(exc, EspRejected):
            await rt.store.outbox.release_send(profile_id, esp, token)
        raise


async def send(rt: Runtime, requeue: Requeue, profile_id: str, esp: str, retry_refused: bool = False,
               patience: float | None = None) -> None:
    """Send one profile's pending work to one target: erasures and their read-back, the person's other
    addresses, then the member. Idempotent: what the target already holds is skipped without a request.
    ``patience``: how long the member's write waits for its rate (then RateSpent; address work waits as ever)."""
    client = target(rt, esp)
    if client is None:
        return
    started = time.perf_counter()
    claim = await rt.store.outbox.claim_send(profile_id, esp, rt.leases[esp])
    if claim is not None:
        await send_claimed(rt, requeue, client, profile_id, esp, *claim, started=started, retry_refused=retry_refused, patience=patience)


async def send_claimed(rt: Runtime, requeue: Requeue, client: Esp, profile_id: str, esp: str, state: SyncState, token: str, *,
                       started: float, retry_refused: bool = False, patience: float | None = None) -> None:
    """:func:`send` once its lease is held (``token``): also the path of a sync round's profiles with address work."""
    lease = rt.leases[esp]
    if state.has_address_work:
        await fence(rt, client, profile_id, esp, state, token)
    if state.erase or state.verify:
        if not await erase(rt, requeue, client, profile_id, esp, state, token):
            return
    # The person's other addresses: unsubscribed where they are, retired where they were replaced.
    current = client.key(state.member) if state.member else None
    for name, call in (("unsubscribe", client.unsubscribe), ("retire", client.retire)):
        emails = getattr(state, name)
        if emails:
            await _calls(rt, profile_id, esp, token, [partial(call, email) for email in emails if email != current])
            await rt.store.outbox.done(profile_id, esp, token, name, emails)
    if not policy.needs_send(state, retry_refused):
        log.debug("profile %s has nothing new to send to %s", profile_id, esp)
        async with _released_if_it_fails(rt, esp, token, [profile_id], lease):
            await rt.store.outbox.release_send(profile_id, esp, token)
        return
    jobs: list[str] = []

    async def accepted(job_id: str) -> None:
        jobs.append(job_id)
        await rt.store.outbox.note_job(esp, token, job_id, [profile_id])

    try:
        with rate_patience(patience) if patience is not None else nullcontext():
            await _calls(rt, profile_id, esp, token, [partial(client.upsert, state.member, accepted)])
    except EspRejected as exc:
        async with _released_if_it_fails(rt, esp, token, [profile_id], lease):
            await rt.store.outbox.mark_failed(profile_id, esp, token, state.member_hash, exc.code)
        if rt.trail is not None:
            rt.trail.add([f"profile:{profile_id}"], "refused", profile=profile_id, target=esp, request="single", status=exc.code)
        raise
    async with _released_if_it_fails(rt, esp, token, [profile_id], lease):
        recorded = await rt.store.outbox.mark_sent(profile_id, esp, token, state.member_hash, jobs)
    if recorded:
        count_sent(rt, esp, [state], "single", started, [profile_id])
        log.info("profile %s synced to %s", profile_id, esp)
    else:
        log.warning("profile %s sent to %s after its send lease ran out; the lease's holder records its own send", profile_id, esp)


async def fence(rt: Runtime, client: Esp, profile_id: str, esp: str, state: SyncState, token: str) -> None:
    """Before address work (deleting, retiring, unsubscribing contacts): wait for every send that may
    still write one of them — a bulk job that carried the person (its id was recorded when the ESP
    accepted it), or a send of a profile merged into this one that may still be in flight — or it
    could bring the contact back afterwards. Raises SyncBusy (the send lease released) while one may."""
    for job in state.jobs:
        if not await client.job_done(job):
            await rt.store.outbox.release_send(profile_id, esp, token)
            raise SyncBusy(f"a bulk job to {esp} that carries this person is still running", retry_after=2.0)
        await rt.store.outbox.job_finished(profile_id, esp, token, job)
    now = datetime.now(timezone.utc)
    if state.fence_until is not None and state.fence_until > now:
        await rt.store.outbox.release_send(profile_id, esp, token)
        raise SyncBusy(f"a send to {esp} of a profile merged into this one may still be in flight",
                       retry_after=min(2.0, (state.fence_until - now).total_seconds()))


async def erase(rt: Runtime, requeue: Requeue, client: Esp, profile_id: str, esp: str, state: SyncState, token: str) -> bool:
    """Delete every address of an erased person at ``esp``, then read back that the ESP holds none
    (after :func:`fence`). A refusal is recorded on the receipts as failed and retried by the
    sweeper, never dead-lettered away. Returns False when the send must stop here (waiting or refused).
    """
    try:
        await _calls(rt, profile_id, esp, token, [partial(client.erase, email) for email in state.erase])
    except EspRejected as exc:
        await rt.receipts.mark(profile_id, esp, "failed", exc.code)
        await rt.store.outbox.release_send(profile_id, esp, token)
        log.warning("erasure at %s refused for profile %s (%s); retried by the sweeper", esp, profile_id, exc.code)
        return False
    if state.erase:
        await rt.store.outbox.forget(profile_id, esp, token, state.erase)
        await rt.receipts.mark(profile_id, esp, "deleted")
    checking = sorted({*state.verify, *state.erase})
    held = [email for email in checking if await client.held(email) is not None]
    await rt.store.outbox.done(profile_id, esp, token, "verify", [email for email in checking if email not in held])
    if not held:
        await rt.receipts.mark(profile_id, esp, "verified")
        return True
    checks = await rt.store.outbox.checked(profile_id, esp, token)
    if policy.delete_again(checks):
        await rt.store.outbox.redo(profile_id, esp, token, held)
    await rt.store.outbox.release_send(profile_id, esp, token)
    await requeue.read_back(profile_id, esp, policy.verify_delay_ms(checks))
    log.info("erasure at %s: %d contact(s) of profile %s not gone yet; read back again later", esp, len(held), profile_id)
    return False


async def sync(rt: Runtime, requeue: Requeue, profile_id: str, esp: str, urgent: bool = False, alone: bool = False,
               retry_refused: bool = False, rounds: Round | None = None, expect: Expected | None = None) -> None:
    """One scheduled sync of a profile, routed by the policy. Left pending in MongoDB for the sweeper
    rather than sent: while the target's circuit is open, while another send of the profile is in
    flight (the sweeper sends what is left after it), and when the policy leaves it to the sweeper.

    ``rounds``: where a sync sent now joins the syncs in flight (``rounds.py``; a target where every write is
    a job gets one per lane gap there, with the syncs that came meanwhile); urgent ones and replayed dead
    letters go on their own. Without rounds, a middling backlog, and every sync of a target where every
    write is a job, takes the others pending along. ``expect``: what the merge that scheduled it wrote, for the round."""
    client = rt.esps.get(esp)
    if client is not None:
        backlog = 0 if (urgent or alone) else await rt.backlog(esp)
        chosen = policy.route(urgent=urgent, alone=alone, backlog=backlog, bulk_backlog=rt.settings.sync_bulk_backlog,
                              prefers_bulk=client.prefers_bulk, gathered=rounds is not None)
        if chosen is policy.Route.LEAVE:
            return  # still pending: the sweeper sends it with the backlog, in bulk
        if chosen is policy.Route.TAKE_ALONG:
            # One bulk request carries them all (their own syncs then find nothing to send).
            others = await rt.store.outbox.pending_ids(esp, limit=policy.take_along_limit(client.batch_limit))
            await send_batch(rt, requeue, [profile_id, *[pid for pid in others if pid != profile_id]], esp)
            return
    if rounds is not None and not (urgent or retry_refused):
        await rounds.sync(profile_id, esp, expect)
        return
    await send_or_park(rt, requeue, profile_id, esp, retry_refused)


@asynccontextmanager
async def parked_while_blocked(rt: Runtime, profile_id: str, esp: str) -> AsyncIterator[None]:
    """Around a send: while its target's circuit is open or another send holds the profile, the profile
    is left pending for the sweeper instead."""
    try:
        yield
    except (CircuitOpen, SyncBusy) as exc:
        await rt.store.outbox.park([profile_id], esp)
        log.debug("sync of %s to %s parked: %s", profile_id, esp, exc.code)


async def send_or_park(rt: Runtime, requeue: Requeue, profile_id: str, esp: str, retry_refused: bool = False,
                       patience: float | None = None) -> None:
    async with parked_while_blocked(rt, profile_id, esp):
        await send(rt, requeue, profile_id, esp, retry_refused, patience)
