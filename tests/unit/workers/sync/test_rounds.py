"""Sync rounds in-process: the syncs in flight are claimed, sent and recorded together. A fake ESP and
the in-memory outbox; the same rounds run against RabbitMQ, MongoDB and the sandboxes in ``tests/system``
(every sync there goes through them) and in ``bench/sync_latency.py``."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

from pymongo.errors import AutoReconnect

from adapters.esps.base import member_hash
from schemas.errors import EspRejected, RateSpent
from schemas.sync import Expected, Settlement
from tests.support.fake_esp import FakeEsp
from tests.support.outbox import FakeOutbox
from tests.unit.workers.sync.test_actors import TARGET, Harness, member
from workers.sync import policy
from workers.sync.outcomes import Carried, documents
from workers.sync.rounds import RIDERS_OVER_TAKES, SyncRounds


class Counting(FakeOutbox):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def claim_round(self, pairs, leases, token=None):
        self.calls.append("claim_round")
        return await super().claim_round(pairs, leases, token)

    async def claim_expected(self, expected, leases, riders=(), token=None):
        self.calls.append("claim_expected")
        return await super().claim_expected(expected, leases, riders, token)

    async def settle(self, *settlements, wait_s=0.0):
        self.calls.append("settle")
        return await super().settle(*settlements, wait_s=wait_s)


class Requeued:
    def __init__(self) -> None:
        self.sent_alone: list[str] = []
        self.refused_ids: list[str] = []

    async def alone(self, profile_ids, esp):
        self.sent_alone += profile_ids

    async def read_back(self, profile_id, esp, delay_ms):
        pass

    async def refused(self, profile_id, esp, reason):
        self.refused_ids.append(profile_id)


async def run_round(h: Harness, ids: list[str]) -> tuple[SyncRounds, list[BaseException | None]]:
    rounds = SyncRounds(await h._runtime(), Requeued())
    results = await asyncio.gather(*(rounds.sync(pid, TARGET) for pid in ids), return_exceptions=True)
    return rounds, list(results)


def test_the_syncs_in_flight_are_claimed_sent_and_recorded_in_one_round(fake):
    h = Harness()
    h.outbox = Counting()
    ids = [f"p{n}" for n in range(10)]
    for n, pid in enumerate(ids):
        h.outbox.put(pid, TARGET, member(n))
    rounds, results = asyncio.run(run_round(h, [*ids, "p3"]))  # a repeat of a pair shares its outcome
    assert results == [None] * 11 and rounds.rounds == 1
    assert h.outbox.calls == ["claim_round", "settle"]
    assert fake.requests == ["upsert"] * 10 and len(fake.contacts) == 10
    for pid in ids:
        state = h.outbox.state(pid, TARGET)
        assert state.sent_hash == state.member_hash and not state.pending and state.sending_until is None


def test_a_refused_member_fails_its_own_message_only_and_is_recorded(fake):
    h = Harness()
    for n in range(3):
        h.outbox.put(f"p{n}", TARGET, member(n))
    fake.refuse = {"p1@example.com"}
    _, results = asyncio.run(run_round(h, ["p0", "p1", "p2"]))
    assert results[0] is None and results[2] is None and isinstance(results[1], EspRejected)
    assert h.outbox.state("p1", TARGET).failed_code == "esp_rejected" and h.outbox.state("p1", TARGET).sending_until is None
    assert not h.outbox.state("p0", TARGET).pending and not h.outbox.state("p2", TARGET).pending


def test_a_profile_another_send_holds_is_parked_not_sent(fake):
    h = Harness()
    h.outbox.put("p0", TARGET, member(0))
    h.outbox.put("p1", TARGET, member(1))
    h.outbox.states[("p1", TARGET)].update(sending_until=datetime.now(timezone.utc) + timedelta(seconds=30), sending_token="other")
    _, results = asyncio.run(run_round(h, ["p0", "p1"]))
    assert results == [None, None] and h.outbox.parked == ["p1"]
    assert fake.requests == ["upsert"] and "p1@example.com" not in fake.contacts
    assert h.outbox.states[("p1", TARGET)]["sending_token"] == "other"


def test_address_work_in_a_round_takes_the_single_path_under_the_rounds_lease(fake):
    h = Harness()
    fake.contacts = {"old@example.com": member(99)}
    h.outbox.put("p0", TARGET, member(0))
    h.outbox.put("p1", TARGET, member(1), retire=["old@example.com"])
    _, results = asyncio.run(run_round(h, ["p0", "p1"]))
    assert results == [None, None] and fake.contacts["old@example.com"]["unsubscribed"]
    assert h.outbox.state("p1", TARGET).retire == [] and not h.outbox.state("p1", TARGET).pending
    assert not h.outbox.state("p0", TARGET).pending and h.outbox.parked == []


class FailingSettle(FakeOutbox):
    failures = 1

    async def settle(self, *settlements, wait_s=0.0):
        if self.failures:
            self.failures -= 1
            raise AutoReconnect("connection closed")
        await super().settle(*settlements, wait_s=wait_s)


def test_a_store_failure_recording_a_round_releases_its_leases_and_fails_every_message(fake):
    h = Harness()
    h.outbox = FailingSettle()
    for n in range(3):
        h.outbox.put(f"p{n}", TARGET, member(n))
    _, results = asyncio.run(run_round(h, ["p0", "p1", "p2"]))
    assert all(isinstance(r, AutoReconnect) for r in results)
    assert all(h.outbox.state(f"p{n}", TARGET).sending_until is None and h.outbox.state(f"p{n}", TARGET).pending for n in range(3))
    _, results = asyncio.run(run_round(h, ["p0", "p1", "p2"]))  # the broker's retry sends them again and records it
    assert results == [None] * 3 and not any(h.outbox.state(f"p{n}", TARGET).pending for n in range(3))


def test_rounds_can_be_turned_off(fake):
    h = Harness(sync_round_max=0)
    h.outbox = Counting()
    h.outbox.put("p0", TARGET, member(0))
    h.run(lambda: h.workers.sync.sync_profile.send("p0", TARGET))
    assert "claim_round" not in h.outbox.calls and fake.requests == ["upsert"] and not h.outbox.state("p0", TARGET).pending


class CountingPending(FakeOutbox):
    def __init__(self) -> None:
        super().__init__()
        self.counts = 0

    async def count_pending(self, esp, cap):
        self.counts += 1
        return await super().count_pending(esp, cap)


def test_syncs_route_by_the_sweepers_backlog_count_and_count_for_themselves_only_when_it_is_stale(fake, monkeypatch):
    h = Harness()
    h.outbox = CountingPending()

    async def backlogs():
        rt = await h._runtime()
        rt.backlogs.note(TARGET, 7)  # as the sweeper of the process counted it
        seen = [await rt.backlog(TARGET) for _ in range(3)]
        monkeypatch.setattr(policy, "BACKLOG_TTL_S", 0.0)
        return seen, await rt.backlog(TARGET)

    seen, stale = asyncio.run(backlogs())
    assert seen == [7, 7, 7] and stale == 0 and h.outbox.counts == 1


def test_a_lone_sync_takes_the_single_path(fake):
    h = Harness()
    h.outbox = Counting()
    h.outbox.put("p0", TARGET, member(0))
    rounds, results = asyncio.run(run_round(h, ["p0"]))
    assert results == [None] and rounds.rounds == 1 and h.outbox.calls == []  # claim_send and mark_sent, no round
    assert fake.requests == ["upsert"] and not h.outbox.state("p0", TARGET).pending


class Jobs:
    """The fake ESP as a target where every write is a job: each bulk request waits for ``release``."""

    def __init__(self, fake, monkeypatch, refuse_whole: bool = False, accept: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.started: list[float] = []
        self.accepted: list[float] = []
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()
        upsert_batch = fake.upsert_batch

        async def gated(esp, members, on_job=None):
            self.batches.append(sorted(esp.key(m) for m in members))
            self.started.append(time.monotonic())
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            try:
                if accept and on_job is not None:  # the ESP accepted the job; it runs until released
                    self.accepted.append(time.monotonic())  # before the round hears of it: the gap counts from then or later
                    await on_job(f"job-{len(self.batches)}")
                await self.release.wait()
                if refuse_whole:
                    raise EspRejected("invalid_request: one member spoils the request")
                return await upsert_batch(esp, members, on_job)
            finally:
                self.running -= 1

        monkeypatch.setattr(fake, "prefers_bulk", True)
        monkeypatch.setattr(fake, "upsert_batch", gated)


async def until(condition, deadline_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + deadline_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_a_job_target_starts_no_job_before_the_last_is_accepted_and_sends_the_syncs_that_came_meanwhile_in_the_next(fake, monkeypatch):
    h = Harness()
    h.outbox = Counting()
    jobs = Jobs(fake, monkeypatch)
    for n in range(6):
        h.outbox.put(f"p{n}", TARGET, member(n))

    async def scenario():
        rounds = SyncRounds(await h._runtime(), Requeued())
        first = [asyncio.ensure_future(rounds.sync(pid, TARGET)) for pid in ("p0", "p1")]
        await until(lambda: len(jobs.batches) == 1)
        later = [asyncio.ensure_future(rounds.sync(f"p{n}", TARGET)) for n in range(2, 6)]
        await until(lambda: len(rounds._pending) == 4)  # joined while the job runs: they wait for it
        jobs.release.set()
        return await asyncio.gather(*first, *later, return_exceptions=True)

    results = asyncio.run(scenario())
    assert results == [None] * 6
    assert jobs.batches == [["p0@example.com", "p1@example.com"], [f"p{n}@example.com" for n in range(2, 6)]]
    assert jobs.most_running == 1 and "upsert" not in fake.requests
    assert h.outbox.calls == ["claim_round", "settle"] * 2
    for n in range(6):
        state = h.outbox.state(f"p{n}", TARGET)
        assert state.sent_hash == state.member_hash and not state.pending and state.sending_until is None


def test_a_member_refused_in_a_job_fails_its_own_message_only(fake, monkeypatch):
    h = Harness()
    jobs = Jobs(fake, monkeypatch)
    jobs.release.set()
    for n in range(3):
        h.outbox.put(f"p{n}", TARGET, member(n))
    fake.refuse = {"p1@example.com"}
    _, results = asyncio.run(run_round(h, ["p0", "p1", "p2"]))
    assert results[0] is None and results[2] is None and isinstance(results[1], EspRejected)
    assert len(jobs.batches) == 1 and set(fake.contacts) == {"p0@example.com", "p2@example.com"}
    assert h.outbox.state("p1", TARGET).failed_code == "esp_rejected" and h.outbox.state("p1", TARGET).sending_until is None
    assert not h.outbox.state("p0", TARGET).pending and not h.outbox.state("p2", TARGET).pending


def test_a_job_refused_whole_sends_each_member_on_its_own_once_the_round_is_recorded(fake, monkeypatch):
    h = Harness()
    jobs = Jobs(fake, monkeypatch, refuse_whole=True)
    jobs.release.set()
    for n in range(3):
        h.outbox.put(f"p{n}", TARGET, member(n))
    requeued = Requeued()
    leases_when_requeued: list[object] = []
    alone = requeued.alone

    async def recorded_first(profile_ids, esp):
        leases_when_requeued.extend(h.outbox.state(pid, esp).sending_until for pid in profile_ids)
        await alone(profile_ids, esp)

    requeued.alone = recorded_first

    async def scenario():
        rounds = SyncRounds(await h._runtime(), requeued)
        return await asyncio.gather(*(rounds.sync(f"p{n}", TARGET) for n in range(3)), return_exceptions=True)

    results = asyncio.run(scenario())
    assert results == [None] * 3 and sorted(requeued.sent_alone) == ["p0", "p1", "p2"]
    assert leases_when_requeued == [None] * 3  # released before they go alone, so they can claim
    assert all(h.outbox.state(f"p{n}", TARGET).pending for n in range(3)) and fake.contacts == {}


def test_once_a_job_is_accepted_the_next_starts_a_lane_gap_later_while_it_still_runs(fake, monkeypatch):
    h = Harness()
    jobs = Jobs(fake, monkeypatch, accept=True)
    for n in range(4):
        h.outbox.put(f"p{n}", TARGET, member(n))

    async def scenario():
        rounds = SyncRounds(await h._runtime(), Requeued(), lane_gap_s=0.05)
        first = [asyncio.ensure_future(rounds.sync(pid, TARGET)) for pid in ("p0", "p1")]
        await until(lambda: len(jobs.accepted) == 1)
        later = [asyncio.ensure_future(rounds.sync(pid, TARGET)) for pid in ("p2", "p3")]
        await until(lambda: len(jobs.batches) == 2)  # the first job still runs
        jobs.release.set()
        return await asyncio.gather(*first, *later, return_exceptions=True)

    results = asyncio.run(scenario())
    assert results == [None] * 4 and jobs.most_running == 2
    assert jobs.batches == [["p0@example.com", "p1@example.com"], ["p2@example.com", "p3@example.com"]]
    assert jobs.started[1] - jobs.accepted[0] >= 0.05
    for n in range(4):
        state = h.outbox.state(f"p{n}", TARGET)
        assert state.sent_hash == state.member_hash and not state.pending and state.sending_until is None and state.jobs == []


class SlowCount(CountingPending):
    async def count_pending(self, esp, cap):
        await asyncio.sleep(0.01)
        return await super().count_pending(esp, cap)


def test_syncs_that_find_the_backlog_count_stale_together_share_one_count(fake):
    h = Harness()
    h.outbox = SlowCount()
    for n in range(3):
        h.outbox.put(f"p{n}", TARGET, member(n))

    async def together():
        rt = await h._runtime()
        return await asyncio.gather(*(rt.backlog(TARGET) for _ in range(20)))

    assert asyncio.run(together()) == [3] * 20 and h.outbox.counts == 1


def test_a_lone_sync_at_a_job_target_goes_in_a_round_so_the_next_job_need_not_wait_for_its_end(fake, monkeypatch):
    h = Harness()
    h.outbox = Counting()
    jobs = Jobs(fake, monkeypatch, accept=True)
    for n in range(2):
        h.outbox.put(f"p{n}", TARGET, member(n))

    async def scenario():
        rounds = SyncRounds(await h._runtime(), Requeued(), lane_gap_s=0.01, carry_s=1.0)
        first = asyncio.ensure_future(rounds.sync("p0", TARGET))
        await until(lambda: len(jobs.accepted) == 1)
        second = asyncio.ensure_future(rounds.sync("p1", TARGET))
        await until(lambda: len(jobs.batches) == 2)  # while the first job still runs
        jobs.release.set()
        return await asyncio.gather(first, second, return_exceptions=True)

    assert asyncio.run(scenario()) == [None, None] and jobs.most_running == 2
    # Both jobs' records in one write: the first to wait out its carry takes the other along.
    assert h.outbox.calls == ["claim_round", "claim_round", "settle"]
    assert not h.outbox.state("p0", TARGET).pending and not h.outbox.state("p1", TARGET).pending


LANE = "lane"


class Lane(FakeEsp):
    """A second target where every write is a job, accepted at once and running until ``release``."""

    prefers_bulk = True

    def __init__(self) -> None:
        super().__init__(LANE, {"first_name": "first_name"})
        self.release = asyncio.Event()
        self.jobs: list[list[str]] = []
        self.accepted_at: list[float] = []

    async def upsert_batch(self, members, on_job=None):
        self.jobs.append(sorted(self.key(m) for m in members))
        self.accepted_at.append(time.monotonic())  # before the round hears of it: the gap counts from then or later
        await on_job(f"job-{len(self.jobs)}")
        await self.release.wait()
        return {}


class Claims(Counting):
    def __init__(self) -> None:
        super().__init__()
        self.claimed: list[list[tuple[str, str]]] = []
        self.claimed_at: dict[tuple[str, str], float] = {}

    async def claim_round(self, pairs, leases, token=None):
        self.claimed.append(sorted((esp, pid) for esp, pids in pairs.items() for pid in pids))
        self.claimed_at.update({(esp, pid): time.monotonic() for esp, pids in pairs.items() for pid in pids})
        return await super().claim_round(pairs, leases, token)

    async def claim_send(self, profile_id, esp, lease):
        self.claimed.append([(esp, profile_id)])
        self.claimed_at[esp, profile_id] = time.monotonic()
        return await super().claim_send(profile_id, esp, lease)


async def with_lane(h: Harness, lane: Lane, gap_s: float, carry_s: float = 1.0, note_carry_s: float = 0.0) -> SyncRounds:
    rt = await h._runtime()
    rt.esps[LANE] = lane
    rt.leases[LANE] = rt.leases[TARGET]
    return SyncRounds(rt, Requeued(), lane_gap_s=gap_s, carry_s=carry_s, note_carry_s=note_carry_s)


def a_lane_sync_and_a_change(outbox: FakeOutbox) -> None:
    """p0 pending at the lane only; p1, one change, pending at both targets."""
    outbox.put("p0", LANE, member(0))
    for esp in (TARGET, LANE):
        outbox.put("p1", esp, member(1))


def test_once_a_lane_job_is_accepted_a_profile_waiting_for_the_lane_keeps_its_other_targets_back_for_one_round(fake):
    h = Harness()
    h.outbox = Claims()
    lane = Lane()
    a_lane_sync_and_a_change(h.outbox)

    async def scenario():
        rounds = await with_lane(h, lane, gap_s=0.15)
        first = asyncio.ensure_future(rounds.sync("p0", LANE))
        await until(lambda: len(lane.accepted_at) == 1)
        change = [asyncio.ensure_future(rounds.sync("p1", esp)) for esp in (TARGET, LANE)]  # one change, both targets
        await until(lambda: len(lane.jobs) == 2)
        lane.release.set()
        return await asyncio.gather(first, *change, return_exceptions=True)

    assert asyncio.run(scenario()) == [None] * 3
    assert h.outbox.claimed == [[(LANE, "p0")], [(TARGET, "p1"), (LANE, "p1")]]  # the change: one claim
    assert h.outbox.calls.count("settle") == 1  # both jobs' records in one write: the first to wait out its carry takes the other
    assert h.outbox.claimed_at[TARGET, "p1"] - lane.accepted_at[0] >= 0.15  # it waited for the lane's gap
    assert lane.jobs == [["p0@example.com"], ["p1@example.com"]] and fake.contacts.keys() == {"p1@example.com"}
    for esp in (TARGET, LANE):
        state = h.outbox.state("p1", esp)
        assert state.sent_hash == state.member_hash and not state.pending and state.sending_until is None


def test_before_the_lane_job_is_accepted_the_other_targets_of_a_profile_waiting_for_the_lane_go_ahead(fake, monkeypatch):
    h = Harness()
    h.outbox = Claims()
    lane = Lane()
    accept = asyncio.Event()
    upsert_batch = lane.upsert_batch

    async def accepted_when_let(members, on_job=None):
        await accept.wait()
        return await upsert_batch(members, on_job)

    monkeypatch.setattr(lane, "upsert_batch", accepted_when_let)
    a_lane_sync_and_a_change(h.outbox)

    async def scenario():
        rounds = await with_lane(h, lane, gap_s=0.01)
        first = asyncio.ensure_future(rounds.sync("p0", LANE))
        await until(lambda: len(h.outbox.claimed) == 1)
        change = [asyncio.ensure_future(rounds.sync("p1", esp)) for esp in (TARGET, LANE)]
        await until(lambda: "p1@example.com" in fake.contacts)  # sent while the lane's job waits for acceptance
        assert len(lane.jobs) == 0
        accept.set()
        lane.release.set()
        return await asyncio.gather(first, *change, return_exceptions=True)

    assert asyncio.run(scenario()) == [None] * 3
    assert h.outbox.claimed == [[(LANE, "p0")], [(TARGET, "p1")], [(LANE, "p1")]]
    assert lane.jobs == [["p0@example.com"], ["p1@example.com"]]


class Notes(Claims):
    def __init__(self) -> None:
        super().__init__()
        self.notes: list[list[str]] = []

    async def note_job(self, esp, token, job_id, profile_ids, settled=()):
        self.notes.append(sorted({part[0] for settlement in settled for part in settlement.parts}))
        return await super().note_job(esp, token, job_id, profile_ids, settled)


def test_a_rounds_other_targets_are_recorded_with_the_lane_jobs_note_and_answered_before_the_job_ends(fake):
    h = Harness()
    h.outbox = Notes()
    lane = Lane()
    for esp in (TARGET, LANE):
        h.outbox.put("p1", esp, member(1))

    async def scenario():
        rounds = await with_lane(h, lane, gap_s=0.05)
        other, at_lane = (asyncio.ensure_future(rounds.sync("p1", esp)) for esp in (TARGET, LANE))
        await until(other.done)  # while the lane's job still runs
        state = h.outbox.state("p1", TARGET)
        assert state.sent_hash == state.member_hash and state.sending_until is None and not at_lane.done()
        assert h.outbox.state("p1", LANE).jobs == ["job-1"]
        lane.release.set()
        return await asyncio.gather(other, at_lane, return_exceptions=True)

    assert asyncio.run(scenario()) == [None, None]
    assert h.outbox.notes == [[TARGET]]  # the other target's outcome went with the note
    assert h.outbox.calls == ["claim_round", "settle"]  # one claim, the note, one record: three writes for the change
    state = h.outbox.state("p1", LANE)
    assert state.sent_hash == state.member_hash and state.jobs == [] and state.sending_until is None


def test_when_the_jobs_note_fails_the_other_targets_are_recorded_with_the_rest_of_the_round(fake):
    h = Harness()

    class Failing(Notes):
        async def note_job(self, esp, token, job_id, profile_ids, settled=()):
            self.notes.append(sorted({part[0] for settlement in settled for part in settlement.parts}))
            raise AutoReconnect("the store went away")

    h.outbox = Failing()
    lane = Lane()
    lane.release.set()
    for esp in (TARGET, LANE):
        h.outbox.put("p1", esp, member(1))

    async def scenario():
        rounds = await with_lane(h, lane, gap_s=0.05)
        return await asyncio.gather(*(rounds.sync("p1", esp) for esp in (TARGET, LANE)), return_exceptions=True)

    other, at_lane = asyncio.run(scenario())
    assert other is None and isinstance(at_lane, AutoReconnect)  # the job's message is retried
    assert h.outbox.notes == [[TARGET]] and h.outbox.calls == ["claim_round", "settle"]
    state = h.outbox.state("p1", TARGET)
    assert state.sent_hash == state.member_hash and state.sending_until is None  # recorded by the round's own write
    assert h.outbox.state("p1", LANE).sending_until is not None  # its job may have run: the lease runs out by itself


class JobByJob(Lane):
    """The lane, each job running until its own release."""

    def __init__(self) -> None:
        super().__init__()
        self.releases: list[asyncio.Event] = []

    async def upsert_batch(self, members, on_job=None):
        self.jobs.append(sorted(self.key(m) for m in members))
        self.releases.append(done := asyncio.Event())
        await on_job(f"job-{len(self.jobs)}")
        await done.wait()
        return {}


def two_at_the_lane_two_at_the_target(outbox: FakeOutbox) -> None:
    """p0 and p1 pending at the lane, p2 and p3 at the other target."""
    for n in range(2):
        outbox.put(f"p{n}", LANE, member(n))
    for n in (2, 3):
        outbox.put(f"p{n}", TARGET, member(n))


async def first_job_ended(rounds: SyncRounds, lane: JobByJob) -> asyncio.Future[None]:
    """A lane sync of p0 whose job ended: its record now waits for a ride."""
    first = asyncio.ensure_future(rounds.sync("p0", LANE))
    await until(lambda: len(lane.releases) == 1)
    lane.releases[0].set()
    await until(lambda: rounds.waiting_records == 1)
    return first


def test_a_lane_jobs_record_rides_the_next_write_of_the_rounds_and_its_message_is_answered_only_then(fake):
    h = Harness()
    h.outbox = Notes()
    lane = JobByJob()
    two_at_the_lane_two_at_the_target(h.outbox)

    async def scenario():
        rounds = await with_lane(h, lane, gap_s=0.01, carry_s=60)  # no record goes on its own in this test
        first = await first_job_ended(rounds, lane)
        state = h.outbox.state("p0", LANE)
        assert not first.done() and state.sent_hash is None and state.sending_until is not None
        second = asyncio.ensure_future(rounds.sync("p1", LANE))
        await until(first.done)  # the second job's note carried it
        state = h.outbox.state("p0", LANE)
        assert state.sent_hash == state.member_hash and state.sending_until is None and state.jobs == []
        assert not second.done() and h.outbox.notes == [[], [LANE]]
        lane.releases[1].set()
        await until(lambda: rounds.waiting_records == 1)
        assert not second.done()  # its record waits for a ride
        # A round at another target (two profiles: not the single path) records the second job's outcome with its own.
        others = await asyncio.gather(*(rounds.sync(pid, TARGET) for pid in ("p2", "p3")))
        return [await first, await second, *others]

    assert asyncio.run(scenario()) == [None] * 4
    assert h.outbox.calls == ["claim_round", "claim_round", "claim_round", "settle"]  # three claims, two notes, one record
    for pid, esp in (("p1", LANE), ("p2", TARGET), ("p3", TARGET)):
        state = h.outbox.state(pid, esp)
        assert state.sent_hash == state.member_hash and state.sending_until is None and not state.pending


def test_a_lane_record_that_rode_a_failed_write_waits_for_the_next_or_goes_on_its_own(fake):
    h = Harness()

    class FailingNote(Notes):
        async def note_job(self, esp, token, job_id, profile_ids, settled=()):
            await super().note_job(esp, token, job_id, profile_ids, ())  # the job is noted, its riders are not written
            if settled:
                self.notes[-1] = ["failed"]
                raise AutoReconnect("the store went away")

    h.outbox = FailingNote()
    lane = JobByJob()
    for n in range(2):
        h.outbox.put(f"p{n}", LANE, member(n))

    async def scenario():
        rounds = await with_lane(h, lane, gap_s=0.01, carry_s=2.0)
        first = await first_job_ended(rounds, lane)
        second = asyncio.ensure_future(rounds.sync("p1", LANE))
        await until(lambda: len(lane.releases) == 2)
        await until(lambda: h.outbox.notes == [[], ["failed"]])  # the first's record rode the second's failed note
        lane.releases[1].set()
        return await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 30)  # a lost record would hang

    first, second = asyncio.run(scenario())
    # The second job's note failed with the first's record in it: its message is retried, the first's
    # record went back to wait and was written on its own, so its message succeeded.
    assert first is None and isinstance(second, AutoReconnect)
    state = h.outbox.state("p0", LANE)
    assert state.sent_hash == state.member_hash and state.sending_until is None


def test_a_lane_round_without_an_accepted_job_records_at_once(fake):
    """Nothing to carry: the member is already at the lane, so the round releases it and answers at once."""
    h = Harness()
    h.outbox = Notes()
    lane = JobByJob()
    h.outbox.put("p0", LANE, member(0))
    h.outbox.states["p0", LANE]["sent_hash"] = h.outbox.states["p0", LANE]["member_hash"]

    async def scenario():
        rounds = await with_lane(h, lane, gap_s=0.01, carry_s=60)
        return await asyncio.wait_for(rounds.sync("p0", LANE), 10)  # not the 60 s carry

    assert asyncio.run(scenario()) is None
    assert lane.jobs == [] and h.outbox.state("p0", LANE).sending_until is None


def test_a_change_at_the_lane_of_a_profile_whose_record_waits_writes_that_record_first_rather_than_parking(fake):
    h = Harness()
    h.outbox = Notes()
    lane = JobByJob()
    h.outbox.put("p0", LANE, member(0))

    async def scenario():
        rounds = await with_lane(h, lane, gap_s=0.01, carry_s=60)
        first = await first_job_ended(rounds, lane)
        h.outbox.put("p0", LANE, member(5))  # the next change, while the first job's record waits
        second = asyncio.ensure_future(rounds.sync("p0", LANE))
        await until(lambda: len(lane.releases) == 2)  # sent, not parked: the waiting record went before the claim
        assert first.done() and await first is None
        lane.releases[1].set()
        await until(lambda: rounds.waiting_records == 1)
        others = asyncio.gather(*(rounds.sync(pid, TARGET) for pid in ("p2", "p3")))  # a round whose record takes it along
        return await asyncio.wait_for(asyncio.gather(second, others), 10)

    for pid in ("p2", "p3"):
        h.outbox.put(pid, TARGET, member(int(pid[1])))
    asyncio.run(scenario())
    assert h.outbox.parked == [] and len(lane.jobs) == 2
    state = h.outbox.state("p0", LANE)
    assert state.sent_hash == state.member_hash == member_hash(member(5)) and state.sending_until is None


class SingleBudget:
    """The fake ESP with ``left`` single writes in its rate (then RateSpent, as the guard raises it): its
    bulk requests have a budget of their own."""

    def __init__(self, fake, monkeypatch, left: int, retry_after: float = 30.0) -> None:
        self.left, self.attempts = left, 0
        upsert = fake.upsert

        async def limited(esp, member, on_job=None):
            self.attempts += 1
            if self.left <= 0:
                raise RateSpent("fake import rate spent", retry_after=retry_after)
            self.left -= 1
            return await upsert(esp, member, on_job)

        monkeypatch.setattr(fake, "upsert", limited)


def test_members_that_find_the_single_rate_spent_go_in_one_job_and_the_target_goes_in_jobs_while_it_is_spent(fake, monkeypatch):
    h = Harness()
    budget = SingleBudget(fake, monkeypatch, left=1)
    for n in range(6):
        h.outbox.put(f"p{n}", TARGET, member(n))

    async def scenario():
        rounds = SyncRounds(await h._runtime(), Requeued())
        first = await asyncio.gather(*(rounds.sync(f"p{n}", TARGET) for n in range(4)), return_exceptions=True)
        spent_after_first = rounds.spent
        lone = await asyncio.gather(rounds.sync("p4", TARGET), return_exceptions=True)  # alone, yet in a job while spent
        later = await asyncio.gather(rounds.sync("p5", TARGET), return_exceptions=True)
        return [*first, *lone, *later], spent_after_first

    results, spent = asyncio.run(scenario())
    assert results == [None] * 6 and spent == {TARGET}
    assert budget.attempts == 4  # the first round tried each once; while spent, nothing tries a single write
    assert fake.requests == ["upsert", "batch", "batch", "batch"]
    assert set(fake.contacts) == {f"p{n}@example.com" for n in range(6)}
    for n in range(6):
        state = h.outbox.state(f"p{n}", TARGET)
        assert state.sent_hash == state.member_hash and not state.pending and state.sending_until is None


def test_a_target_goes_back_to_single_writes_once_its_rate_has_room_again(fake, monkeypatch):
    h = Harness()
    budget = SingleBudget(fake, monkeypatch, left=0, retry_after=0.05)
    for n in range(4):
        h.outbox.put(f"p{n}", TARGET, member(n))

    async def scenario():
        rounds = SyncRounds(await h._runtime(), Requeued(), lane_gap_s=0.05)
        spilled = await asyncio.gather(*(rounds.sync(f"p{n}", TARGET) for n in range(2)), return_exceptions=True)
        assert rounds.spent == {TARGET}
        await until(lambda: not rounds.spent)  # a gap, or the rate's own retry_after if longer
        budget.left = 5
        again = await asyncio.gather(*(rounds.sync(f"p{n}", TARGET) for n in range(2, 4)), return_exceptions=True)
        return [*spilled, *again]

    assert asyncio.run(scenario()) == [None] * 4
    assert fake.requests == ["batch", "upsert", "upsert"] and budget.attempts == 4
    assert set(fake.contacts) == {f"p{n}@example.com" for n in range(4)}


def test_a_lone_sync_that_finds_the_single_rate_spent_goes_again_in_a_job(fake, monkeypatch):
    h = Harness()
    budget = SingleBudget(fake, monkeypatch, left=0)
    h.outbox.put("p0", TARGET, member(0))

    async def scenario():
        rounds = SyncRounds(await h._runtime(), Requeued())
        return await rounds.sync("p0", TARGET), rounds.spent

    assert asyncio.run(scenario()) == (None, {TARGET})
    assert budget.attempts == 1 and fake.requests == ["batch"] and set(fake.contacts) == {"p0@example.com"}
    state = h.outbox.state("p0", TARGET)
    assert state.sent_hash == state.member_hash and not state.pending and state.sending_until is None


def handed(m: dict) -> Expected:
    """What a merge that wrote member ``m`` hands its sync."""
    return Expected(m, member_hash(m), datetime.now(timezone.utc))


def test_a_round_of_what_the_merges_handed_over_takes_its_leases_without_a_read_and_a_stale_hint_sends_what_is_stored(fake):
    h = Harness()
    h.outbox = Counting()
    for n in range(3):
        h.outbox.put(f"p{n}", TARGET, member(n))
    newer = {**member(2), "fields": {"first_name": "Later"}}

    async def scenario(hints):
        rounds = SyncRounds(await h._runtime(), Requeued())
        return await asyncio.gather(*(rounds.sync(pid, TARGET, hint) for pid, hint in hints.items()))

    assert asyncio.run(scenario({f"p{n}": handed(member(n)) for n in (0, 1)})) == [None, None]
    assert h.outbox.calls == ["claim_expected", "settle"]  # no read: one write takes the leases, one records
    h.outbox.calls.clear()
    h.outbox.put("p2", TARGET, newer)  # a later change replaced p2's member after its sync was scheduled
    h.outbox.put("p0", TARGET, {**member(0), "fields": {"first_name": "Again"}})
    assert asyncio.run(scenario({"p0": handed(h.outbox.state("p0", TARGET).member), "p2": handed(member(2))})) == [None, None]
    assert h.outbox.calls == ["claim_expected", "claim_round", "settle"]  # the stale one read back
    assert fake.contacts["p2@example.com"] == newer  # what is stored is sent, never the stale hint
    state = h.outbox.state("p2", TARGET)
    assert state.sent_hash == member_hash(newer) and not state.pending and state.sending_until is None
    assert fake.contacts["p0@example.com"]["fields"] == {"first_name": "Again"}


class Polled(JobByJob):
    """The lane, noting each job whose acceptance was answered (from then on, the ESP client polls it)."""

    def __init__(self) -> None:
        super().__init__()
        self.polled: list[str] = []

    async def upsert_batch(self, members, on_job=None):
        async def answered(job_id):
            await on_job(job_id)
            self.polled.append(job_id)

        return await super().upsert_batch(members, answered)


def test_a_lane_jobs_note_rides_the_next_rounds_claim_or_goes_on_its_own_a_carry_later(fake):
    h = Harness()
    h.outbox = Notes()
    lane = Polled()
    two_at_the_lane_two_at_the_target(h.outbox)

    async def scenario():
        rounds = await with_lane(h, lane, gap_s=0.01, carry_s=60, note_carry_s=60)
        first = asyncio.ensure_future(rounds.sync("p0", LANE, handed(member(0))))
        await until(lambda: rounds.waiting_records == 1)  # the job runs; its note waits for a ride
        assert h.outbox.state("p0", LANE).jobs == [] and not first.done()
        assert lane.polled == ["job-1"]  # the job is polled meanwhile: its note holds nothing up
        others = await asyncio.gather(*(rounds.sync(pid, TARGET, handed(member(n))) for n, pid in ((2, "p2"), (3, "p3"))))
        assert h.outbox.state("p0", LANE).jobs == ["job-1"]  # written by the next round's claim
        assert h.outbox.calls == ["claim_expected", "claim_expected", "settle"] and h.outbox.notes == []
        lane.releases[0].set()
        await until(lambda: rounds.waiting_records == 1)  # the job's record now waits for a ride in its turn
        rounds = await with_lane(h, lane, gap_s=0.01, carry_s=0.05, note_carry_s=0.05)
        second = asyncio.ensure_future(rounds.sync("p1", LANE, handed(member(1))))
        await until(lambda: h.outbox.state("p1", LANE).jobs == ["job-2"])  # no round came: on its own, while the job runs
        assert not second.done()
        lane.releases[1].set()
        return [*others, await second]

    assert asyncio.run(scenario()) == [None] * 3
    state = h.outbox.state("p1", LANE)
    assert state.sent_hash == state.member_hash and state.jobs == [] and state.sending_until is None
    assert h.outbox.state("p0", LANE).jobs == ["job-1"] and h.outbox.state("p0", LANE).sending_until is not None  # its record still waits


def test_a_claim_carries_the_oldest_waiting_records_of_a_bounded_number_of_profiles_in_their_order(fake):
    """Every send of a round waits for its claim: a claim takes along waiting records of at most
    ``RIDERS_OVER_TAKES`` profiles more than it takes leases of, oldest first; the rest keep waiting."""
    def record(*pids: str) -> Settlement:
        settlement = Settlement("t")
        settlement.add(TARGET, sent=[(pid, "h") for pid in pids])
        return settlement

    note = Settlement("t", noted=[(LANE, "job-1", ["a", "b"])])
    note.add(TARGET, sent=[("a", "h")])
    assert documents(note) == 2 and documents(record("c")) == 1

    async def scenario():
        rounds = SyncRounds(await Harness()._runtime(), Requeued())
        loop = asyncio.get_running_loop()
        rounds._carried = [Carried(s, loop.create_future()) for s in (note, record("c"), record("d"))]
        taken = rounds._riders(1 + RIDERS_OVER_TAKES)  # a claim of one profile
        return [r.settlement for r in taken], [c.settlement for c in rounds._carried]

    taken, left = asyncio.run(scenario())
    assert taken == [note, record("c")] and left == [record("d")]
