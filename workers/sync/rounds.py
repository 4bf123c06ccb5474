"""Group commit for the sync: the plain syncs a worker process has in flight go together.

Each sync of one profile to one target joins the current round. A round claims the send leases of
all its (target, profile) pairs in one write and one read, sends every member (concurrently, each
ESP's guard pacing its own), and records every outcome in one unordered bulk write; a message is
answered (then acked) only once that write is done. Where the merge handed over the members it wrote
(the message's ``expect``), the claim is one write without a read, taking a lease only where the store
still holds exactly that member (else that profile is read), and it carries records waiting for a ride.
A profile with address work (erasures, unsubscribes, retirements) takes the single path (``sender``)
under the round's lease. A lone sync on an idle system takes the single path: two round trips, as
before, except at a lane (below): a round's hold on a lane ends a gap after its job is accepted, the
single path's only with the job.

A target where every write is an asynchronous job (SendGrid: ``prefers_bulk``) is a lane: a round
sends all its members in one job, and the target's next syncs gather until that job is accepted and
the lane's gap has passed, then go in the next one: at most one import per gap per process, however
fast the changes come (SendGrid allows 600 a minute), each job polled to its end by its own round.
Once that job is accepted, a profile waiting for the lane keeps its other targets' syncs back too (at
most a gap): a change's targets then share one claim and one record rather than two of each. Their
outcomes go in the write that notes the job, and their messages are answered then, not at the job's end.
The job's own outcome, once it ends, rides the next write the process's rounds make (a later job's
note, a round's record, the next claim) or goes on its own a carry later; so does the job's note
itself, while the job runs: while changes keep coming, a change at a lane costs about one write. A
message is answered only once the write holding its outcome is done.

A target whose single writes' rate is spent (an ESP's single imports a minute) is a lane too while it is:
a single send waits at most a gap for room, and the members that found none go in one job of the
round (bulk jobs have a budget of their own), then the target's syncs gather for jobs until its single
writes have room again. One ESP's spent rate then costs its own syncs a job's latency, and holds no
worker, nor the other targets' syncs, in the guard's wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import TypeVar

from adapters.esps.base import Esp
from adapters.esps.guard import rate_patience
from adapters.store.outbox import JOB_NOTE_WAIT_S
from schemas.errors import EspRejected, RateSpent
from schemas.sync import Claimed, Expected, Settlement, SyncState
from workers.runtime import Runtime
from workers.sync import sender
from workers.sync.outcomes import Carried, Hold, Outcomes, Pair, answer_all, documents, touches
from workers.sync.sender import Requeue

log = logging.getLogger(__name__)
T = TypeVar("T")

RIDERS_OVER_TAKES = 2
"""A claim carries waiting records of at most this many profiles more than it takes leases of: every send of
its round waits for it, so a pile of records would make the claim, not the records, late (at 20 events/s the
p99 to SendGrid went from 0.93 to 1.05–1.2 s with every waiting record on the claims); the rest wait for a
later claim or their carry."""

class SyncRounds:
    """Parameters:
      rt: the process's runtime.
      requeue: where the single path puts work back (read-backs of erasures).
      max_syncs: most pairs in one round.
      window_s: how long a round waits for more syncs to join it (a change's targets are scheduled together).
      lane_gap_s: the least time between two jobs a lane starts.
      carry_s: how long a lane round's record waits for another write to ride (0: written at once).
      note_carry_s: how long a lane job's note waits to ride the next round's claim (0: written at once).
    """

    def __init__(self, rt: Runtime, requeue: Requeue, max_syncs: int = 500, window_s: float = 0.005, lane_gap_s: float = 0.2,
                 carry_s: float = 0.4, note_carry_s: float = 0.0) -> None:
        self._rt = rt
        self._requeue = requeue
        self._max = max_syncs
        self._window = window_s
        self._gap = lane_gap_s
        self._carry = carry_s
        self._note_carry = note_carry_s
        self._carried: list[Carried] = []
        self._pending: dict[Pair, list[asyncio.Future[None]]] = {}
        self._hints: dict[Pair, Expected | None] = {}
        """What the merge handed over with a pending pair (None: pairs that repeat with another, or without)."""
        self._gathering: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._busy_lanes: dict[str, Hold] = {}
        """Each lane held by a round, with that round's hold."""
        self._spent: dict[str, float] = {}
        """Targets whose single writes' rate is spent, until when (monotonic): lanes meanwhile."""
        self.rounds = 0

    async def sync(self, profile_id: str, esp: str, expect: Expected | None = None) -> None:
        """Send the profile's member to ``esp``, together with whatever else is in flight. ``expect``: what the
        merge that scheduled it wrote (the round then takes the lease without reading, where it still holds)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pair = (esp, profile_id)
        self._hints[pair] = expect if pair not in self._pending or self._hints.get(pair) == expect else None
        self._pending.setdefault(pair, []).append(done)  # a repeat of a pair shares its outcome
        self._gather_soon()
        await done

    def _gather_soon(self) -> None:
        if self._pending and (self._gathering is None or self._gathering.done()):
            self._gathering = asyncio.get_running_loop().create_task(self._gather())

    def _lane(self, esp: str) -> bool:
        client = self._rt.esps.get(esp)
        return client is not None and (client.prefers_bulk or self._spent.get(esp, 0.0) > time.monotonic())

    def _spend(self, esp: str, exc: RateSpent) -> None:
        """``esp``'s single writes are spent: it is a lane until they have room (at least a gap, and several
        round windows, so a sync sent again finds it a lane)."""
        self._spent[esp] = time.monotonic() + max(self._gap, 10 * self._window, exc.retry_after or 0.0)

    @property
    def spent(self) -> set[str]:
        """The targets that go in jobs now because their single writes' rate is spent."""
        now = time.monotonic()
        return {esp for esp, until in self._spent.items() if until > now}

    async def _gather(self) -> None:
        """Start a round with what joined within the window. Rounds overlap: a slow ESP request does not
        hold the next round back (a pair in two rounds at once is busy in the second: the lease decides),
        except at a lane held by a round whose job is not yet accepted (or was, less than a gap ago): its
        pairs wait, and the lane's release gathers them. Once that job is accepted, the other pairs of
        their profiles wait with them, to go in the same round."""
        while self._pending:
            await asyncio.sleep(self._window)
            freeing = {pid for esp, pid in self._pending if (lane := self._busy_lanes.get(esp)) is not None and lane.freeing}
            pairs = [pair for pair in self._pending if pair[0] not in self._busy_lanes and pair[1] not in freeing][:self._max]
            if not pairs:
                return
            lanes, hold = {esp for esp, _ in pairs if self._lane(esp)}, Hold()
            self._busy_lanes.update(dict.fromkeys(lanes, hold))
            hints = {pair: hint for pair in pairs if (hint := self._hints.pop(pair, None)) is not None}
            task = asyncio.get_running_loop().create_task(self._run({pair: self._pending.pop(pair) for pair in pairs}, lanes, hold, hints))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _release(self, lanes: set[str], hold: Hold) -> None:
        """Free the lanes ``hold`` still holds (a later round's hold is not this one's to free)."""
        for esp in lanes:
            if self._busy_lanes.get(esp) is hold:
                del self._busy_lanes[esp]
        self._gather_soon()

    async def _run(self, batch: dict[Pair, list[asyncio.Future[None]]], lanes: set[str], hold: Hold, hints: dict[Pair, Expected]) -> None:
        self.rounds += 1
        try:
            if len(batch) == 1 and not lanes:  # a lone sync takes the single path: two round trips, not three
                (esp, pid), = batch
                try:
                    await sender.send_or_park(self._rt, self._requeue, pid, esp, patience=self._gap)
                except RateSpent as exc:  # the member's write found it spent, its lease released: it goes again, in the lane's next job
                    self._spend(esp, exc)
                    await self.sync(pid, esp)
                errors: dict[Pair, BaseException] = {}
            else:
                errors = await self._sync_round(list(batch), lanes, hold, lambda outcomes: answer_all(batch, outcomes), hints)
        except Exception as exc:  # the store failed: every message of the round is retried by the broker
            errors = dict.fromkeys(batch, exc)
        finally:
            self._release(lanes, hold)
        answer_all(batch, {pair: errors.get(pair) for pair in batch})

    async def _sync_round(self, pairs: list[Pair], held: set[str], hold: Hold,
                          answer: Callable[[dict[Pair, BaseException | None]], None], hints: dict[Pair, Expected]) -> dict[Pair, BaseException]:
        rt = self._rt
        started = time.perf_counter()
        by_target: dict[str, list[str]] = {}
        for esp, pid in pairs:
            if sender.target(rt, esp) is not None:
                by_target.setdefault(esp, []).append(pid)
        if not by_target:
            return {}
        if any(touches(c.settlement, set(pairs)) for c in self._carried):
            await self._record()  # a waiting record of one of these pairs goes first: its lease would make it busy
        claimed = await self._claim(by_target, hints)
        out = Outcomes(Settlement(claimed.token), answer, lane=hold)
        for esp, pid in claimed.busy:
            out.parked.setdefault(esp, []).append(pid)  # another send is in flight: the sweeper sends what is left after it
        plain: dict[str, dict[str, SyncState]] = {}
        alone: list[Pair] = []
        for (esp, pid), state in claimed.states.items():
            if state.has_address_work:
                alone.append((esp, pid))
            else:
                plain.setdefault(esp, {})[pid] = state
        try:
            lanes = {esp for esp in plain if esp in held}
            others = asyncio.gather(*(self._send(esp, rt.esps[esp], states, claimed.token, out) for esp, states in plain.items()
                                      if esp not in lanes))
            if lanes and len(lanes) < len(plain):
                out.others = ({esp: list(states) for esp, states in plain.items() if esp not in lanes}, others)
            await asyncio.gather(others, *(self._send_job(esp, rt.esps[esp], out.lacking(esp, plain[esp]), claimed.token, out, held=True)
                                           for esp in lanes))
            accepted_at = datetime.now(timezone.utc)  # the freshness ends here, not when a carried record is written
            # Only a round whose job was accepted and that records its members there carries it (it freed its lane already).
            carry = hold.freeing and touches(out.settlement, {(esp, pid) for esp in lanes for pid in plain[esp]})
            await (self._record_later(out.settlement) if carry else self._record(out.settlement))
        except Exception:  # the store failed while nothing of these sends is in flight: their leases go at once
            for esp, states in plain.items():
                await rt.store.outbox.release_lost([pid for pid in states if (esp, pid) not in out.holding], esp, claimed.token, rt.leases[esp])
            raise
        for esp, pids in out.parked.items():
            await rt.store.outbox.park(pids, esp)
        for esp, pids in out.alone.items():
            await self._requeue.alone(pids, esp)
        for esp, sent in out.sent.items():
            sender.count_sent(rt, esp, [state for _, state in sent], "single", started, [pid for pid, _ in sent], accepted_at)
            log.info("%d profile(s) synced to %s in a round of %d", len(sent), esp, len(pairs))
        await asyncio.gather(*(self._alone(esp, pid, claimed, started, out) for esp, pid in alone))
        return out.errors

    async def _claim(self, by_target: dict[str, list[str]], hints: dict[Pair, Expected]) -> Claimed:
        """The round's leases: taken without a read for the profiles whose every pair came with what its merge
        wrote (the records waiting for a ride go in that write), read for the rest and for those whose state
        was no longer as handed over."""
        outbox, leases = self._rt.store.outbox, {esp: self._rt.leases[esp] for esp in by_target}
        pairs = [(esp, pid) for esp, pids in by_target.items() for pid in pids]
        unhinted = {pid for esp, pid in pairs if (esp, pid) not in hints}
        handed: dict[str, dict[str, Expected]] = {}
        for esp, pid in pairs:
            if pid not in unhinted:
                handed.setdefault(pid, {})[esp] = hints[esp, pid]
        if not handed:
            return await outbox.claim_round(by_target, leases)
        riders = self._riders(len(handed) + RIDERS_OVER_TAKES)
        claimed, left = await self._carrying(outbox.claim_expected(handed, leases, [r.settlement for r in riders]), riders)
        rest = {esp: [pid for pid in pids if pid not in handed or pid in left] for esp, pids in by_target.items()}
        if rest := {esp: pids for esp, pids in rest.items() if pids}:
            read = await outbox.claim_round(rest, {esp: leases[esp] for esp in rest}, token=claimed.token)
            claimed.states.update(read.states)
            claimed.busy += read.busy
        return claimed

    @property
    def waiting_records(self) -> int:
        """Lane records waiting for a write to ride."""
        return len(self._carried)

    def _riders(self, most_documents: int | None = None) -> list[Carried]:
        """The records waiting for a ride, oldest first: all of them, or those of at most ``most_documents`` profiles."""
        if most_documents is None:
            riders, self._carried = self._carried, []
            return riders
        riders, room = [], most_documents
        while self._carried and (size := documents(self._carried[0].settlement)) <= room:
            room -= size
            riders.append(self._carried.pop(0))
        return riders

    async def _carrying(self, write: Awaitable[T], riders: list[Carried]) -> T:
        """Await ``write``, which holds ``riders``: they are written once it is done, back to wait for the next on failure."""
        try:
            result = await write
        except BaseException:
            self._carried[:0] = riders
            raise
        for rider in riders:
            if not rider.written.done():
                rider.written.set_result(None)
        return result

    async def _record(self, *settlements: Settlement, wait_s: float = 0.0) -> None:
        """Write round records now, with the lane records waiting for a ride."""
        riders = self._riders()
        await self._carrying(self._rt.store.outbox.settle(*settlements, *(r.settlement for r in riders), wait_s=wait_s), riders)

    async def _record_later(self, settlement: Settlement, wait_s: float = 0.0, carry_s: float | None = None) -> None:
        """Write a lane round's record (or job note) with the next write of these rounds, or on its own after
        the carry (``wait_s``: how long a failing store is tried then). A write that took it and failed puts it
        back, so it is never lost between two."""
        carry = self._carry if carry_s is None else carry_s
        if carry <= 0:
            await self._record(settlement, wait_s=wait_s)
            return
        mine = Carried(settlement, asyncio.get_running_loop().create_future())
        self._carried.append(mine)
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(mine.written), carry)
                return
            except TimeoutError:
                if any(c is mine for c in self._carried):  # no ride came: it goes now, with any others waiting
                    self._carried.remove(mine)
                    await self._record(settlement, wait_s=wait_s)
                    return

    async def _alone(self, esp: str, pid: str, claimed: Claimed, started: float, out: Outcomes) -> None:
        try:
            async with sender.parked_while_blocked(self._rt, pid, esp):
                await sender.send_claimed(self._rt, self._requeue, self._rt.esps[esp], pid, esp, claimed.states[esp, pid], claimed.token,
                                          started=started)
        except Exception as exc:
            out.errors[esp, pid] = exc

    async def _send(self, esp: str, client: Esp, states: dict[str, SyncState], token: str, out: Outcomes) -> None:
        """Send the members ``esp`` lacks one by one, each waiting at most a gap for the rate; those that
        found it spent go in one job (and the target is a lane until its rate has room); what it holds already
        is released."""
        todo = out.lacking(esp, states)
        spent: dict[str, SyncState] = {}
        with rate_patience(self._gap):
            await asyncio.gather(*(self._send_one(esp, client, pid, state, token, out, spent) for pid, state in todo.items()))
        if spent:
            log.info("%s's single writes are spent: %d member(s) go in a job", esp, len(spent))
            await self._send_job(esp, client, spent, token, out, held=False)

    async def _send_job(self, esp: str, client: Esp, todo: dict[str, SyncState], token: str, out: Outcomes, held: bool) -> None:
        """Members ``esp`` lacks in one bulk request (its job polled to its end): each refused member fails its
        own message; a request refused whole sends each member on its own, so only a bad one is refused.
        ``held``: the round holds ``esp``'s lane, and frees it a gap after the job is accepted."""
        if not todo:
            return
        jobs: list[str] = []
        notes: list[asyncio.Future[None]] = []

        async def accepted(job_id: str) -> None:
            jobs.append(job_id)
            if held:
                assert out.lane is not None  # a lane's round holds it
                out.lane.freeing = True
                asyncio.get_running_loop().call_later(self._gap, self._release, {esp}, out.lane)  # the next job may start
            note = self._note_job(esp, token, job_id, list(todo), out, held)
            if self._defers_note(held):  # it waits for a ride while the job runs, not before the job is polled
                notes.append(asyncio.ensure_future(note))
            else:
                await note

        try:
            try:
                refused = await client.upsert_batch([state.member for state in todo.values()], accepted)
            finally:
                noted = await asyncio.gather(*notes, return_exceptions=True)  # a job's note is written before its outcome
            if failed := next((e for e in noted if isinstance(e, BaseException)), None):
                raise failed
        except EspRejected as exc:
            if len(todo) > 1:
                out.settlement.add(esp, released=list(todo))
                out.alone.setdefault(esp, []).extend(todo)
                log.warning("job of %d refused by %s (%s); sending them one by one", len(todo), esp, exc.code)
                return
            (state,) = todo.values()
            refused = {client.key(state.member): exc.detail}
        except Exception as exc:
            out.add_unsent(esp, list(todo), exc)
            return
        for pid, state in todo.items():
            reason = refused.get(client.key(state.member))
            if reason is None:
                out.add_sent(esp, pid, state, jobs)
            else:
                out.add_refused(esp, pid, state, EspRejected(reason), jobs, self._rt.trail, "batch")

    def _defers_note(self, held: bool) -> bool:
        """Whether a job's note waits for a ride: only at a lane the round holds (its others' outcomes go with it)."""
        return held and self._note_carry > 0

    async def _note_job(self, esp: str, token: str, job_id: str, pids: list[str], out: Outcomes, held: bool) -> None:
        """Note the job, with the other targets' outcomes when their sends are done within half a gap (they
        usually are: the job's acceptance takes a request too); their messages are answered once it is written.
        (A job of a spent target in a round that holds no lane for it is one of those sends: it waits for none.)"""
        if held and out.others is not None:
            await asyncio.wait([out.others[1]], timeout=self._gap / 2)
        early = out.take_others()
        try:
            if self._defers_note(held):  # its note rides the next round's claim, or goes a carry later
                await self._record_later(Settlement(token, early[0].parts if early else [], noted=[(esp, job_id, pids)]),
                                         wait_s=JOB_NOTE_WAIT_S, carry_s=self._note_carry)
            else:
                riders = self._riders()
                note = self._rt.store.outbox.note_job(esp, token, job_id, pids, [*([early[0]] if early else []), *(r.settlement for r in riders)])
                await self._carrying(note, riders)
        except BaseException:
            if early:
                out.settlement.parts += early[0].parts  # recorded with the rest of the round, then
            raise
        if early:
            out.answer(early[1])

    async def _send_one(self, esp: str, client: Esp, pid: str, state: SyncState, token: str, out: Outcomes,
                        spent: dict[str, SyncState]) -> None:
        """One member; into ``spent`` if the rate had no room for it."""
        jobs: list[str] = []

        async def accepted(job_id: str) -> None:
            jobs.append(job_id)
            await self._rt.store.outbox.note_job(esp, token, job_id, [pid])

        assert state.member is not None  # needs_send: there is a member to send
        try:
            await client.upsert(state.member, accepted)
        except EspRejected as exc:
            out.add_refused(esp, pid, state, exc, [], self._rt.trail, "single")
            return
        except RateSpent as exc:
            self._spend(esp, exc)
            spent[pid] = state
            return
        except Exception as exc:
            out.add_unsent(esp, [pid], exc)
            return
        out.add_sent(esp, pid, state, jobs)
