"""The MongoDB store on a real server (SecantusDB, or MONGODB_URI): races, leases, identity."""

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from pymongo import monitoring
from pymongo.errors import AutoReconnect

from adapters.store import records
from adapters.store.profiles import ProfileStore
from schemas.errors import SyncBusy
from schemas.profile import Profile
from schemas.sync import Expected, Settlement
from tests.conftest import HASHER

T = datetime(2024, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
async def store(mongo_uri):
    store = ProfileStore.connect(mongo_uri, "store" + uuid.uuid4().hex[:8], HASHER)
    await store.ensure_indexes()
    yield store
    await store.client.drop_database(store.profiles.database.name)
    await store.close()


def person(pid: str, email: str, **identifiers) -> Profile:
    return Profile(id=pid, email=email, identifiers={k: (v,) for k, v in identifiers.items()})


async def test_version_guard_rejects_a_lost_race(store):
    assert await store.save(person("p1", "a@example.com"), None, {"mailchimp": ({"m": 1}, "h1")})
    assert not await store.save(person("p1", "a@example.com"), None, {"mailchimp": ({"m": 1}, "h1")})  # already exists
    profile, meta = await store.load("p1")
    assert await store.save(profile, meta.version, {"mailchimp": ({"m": 2}, "h2")})
    assert not await store.save(profile, meta.version, {"mailchimp": ({"m": 3}, "h3")})  # stale version
    _, meta = await store.load("p1")
    assert meta.version == 2 and meta.esp["mailchimp"].member_hash == "h2"


async def test_an_identifier_belongs_to_one_profile(store):
    assert await store.save(person("p1", "a@example.com", shopify="1"), None, {"mailchimp": (None, None)})
    assert await store.save(person("p2", "b@example.com"), None, {"mailchimp": (None, None)})
    found, _ = await store.find_by_keys(["email:zzz@example.com", "shopify:1"])
    assert found.id == "p1"
    other, meta = await store.load("p2")
    # Taking an identifier another profile owns fails like a lost race: the caller re-reads both owners and merges.
    assert not await store.save(other.model_copy(update={"identifiers": {"shopify": ("1",)}}), meta.version, {"mailchimp": (None, None)})
    assert (await store.load("p2"))[1].version == meta.version


async def test_sweeper_claims_a_pending_profile_once_per_lease(store):
    assert await store.save(person("p1", "a@example.com"), None, {"mailchimp": ({"m": 1}, "h1")})
    claim = lambda lease: store.outbox.claim_pending("mailchimp", timedelta(0), timedelta(seconds=lease))  # noqa: E731
    assert await claim(60) == ["p1"]
    assert await claim(60) == []  # within the lease: not again
    assert await claim(0) == ["p1"]  # lease over: again, since it is still pending
    _, token = await store.outbox.claim_send("p1", "mailchimp", timedelta(seconds=30))
    assert await store.outbox.mark_sent("p1", "mailchimp", token, "h1")
    assert await claim(0) == []


async def test_refused_member_is_not_swept_until_it_changes(store):
    assert await store.save(person("p1", "a@example.com"), None, {"mailchimp": ({"m": 1}, "h1")})
    _, token = await store.outbox.claim_send("p1", "mailchimp", timedelta(seconds=30))
    await store.outbox.mark_failed("p1", "mailchimp", token, "h1", "esp_rejected")
    assert await store.outbox.claim_pending("mailchimp", timedelta(0), timedelta(0)) == []
    profile, meta = await store.load("p1")
    assert await store.save(profile, meta.version, {"mailchimp": ({"m": 2}, "h2")})
    assert await store.outbox.claim_pending("mailchimp", timedelta(0), timedelta(0)) == ["p1"]


async def test_refused_members_never_take_the_place_of_sendable_ones(store):
    """The limit counts only what a sync can do: a thousand refused members must not hide the next one."""
    for n in range(5):
        pid = f"r{n}"
        assert await store.save(person(pid, f"{pid}@example.com"), None, {"mailchimp": ({"m": n}, f"h{n}")})
        _, token = await store.outbox.claim_send(pid, "mailchimp", timedelta(seconds=30))
        await store.outbox.mark_failed(pid, "mailchimp", token, f"h{n}", "esp_rejected")
    assert await store.save(person("ok", "ok@example.com"), None, {"mailchimp": ({"m": "ok"}, "h-ok")})
    assert await store.outbox.count_pending("mailchimp", cap=10) == 1
    assert await store.outbox.pending_ids("mailchimp", limit=1) == ["ok"]
    assert await store.outbox.claim_pending("mailchimp", timedelta(0), timedelta(seconds=60), limit=1) == ["ok"]


async def test_pending_ids_put_consent_changes_first_in_one_read_and_a_lone_claim_is_one_round_trip(store):
    for n in range(4):
        assert await store.save(person(f"q{n}", f"q{n}@example.com"), None, {"mailchimp": ({"m": n}, f"h{n}")}, urgent=n == 2)
    store.outbox.profiles = recording = RecordingFilters(store.outbox.profiles)
    assert await store.outbox.pending_ids("mailchimp", limit=3) == ["q2", "q0", "q1"]
    claimed, _ = await store.outbox.claim_sends(["q3"], "mailchimp", timedelta(seconds=30))
    assert recording.calls == ["find", "find_one_and_update"] and list(claimed) == ["q3"]
    assert (await store.outbox.claim_sends(["q3"], "mailchimp", timedelta(seconds=30)))[0] == {}  # its lease is held
    store.outbox.profiles = recording._profiles


async def test_one_send_per_profile_at_a_time(store):
    assert await store.save(person("p1", "a@example.com"), None, {"mailchimp": ({"m": 1}, "h1")})
    state, token = await store.outbox.claim_send("p1", "mailchimp", timedelta(seconds=30))
    assert state.member_hash == "h1"
    with pytest.raises(SyncBusy) as busy:
        await store.outbox.claim_send("p1", "mailchimp", timedelta(seconds=30))
    assert 0 < busy.value.retry_after <= 30
    assert await store.outbox.mark_sent("p1", "mailchimp", token, "h1")
    assert (await store.outbox.claim_send("p1", "mailchimp", timedelta(seconds=30)))[0].sent_hash == "h1"
    assert await store.outbox.claim_send("nobody", "mailchimp", timedelta(seconds=30)) is None


async def test_a_send_that_outlived_its_lease_cannot_overwrite_the_next_holders_record(store):
    assert await store.save(person("p1", "a@example.com"), None, {"mailchimp": ({"m": 1}, "h1")})
    _, late = await store.outbox.claim_send("p1", "mailchimp", timedelta(0))  # a lease that is over at once
    profile, meta = await store.load("p1")
    assert await store.save(profile, meta.version, {"mailchimp": ({"m": 2}, "h2")})
    state, holder = await store.outbox.claim_send("p1", "mailchimp", timedelta(seconds=30))
    assert state.member_hash == "h2"
    # The first send finishes after its lease ran out: what it sent (h1) must not be recorded, nor end the lease.
    assert not await store.outbox.mark_sent("p1", "mailchimp", late, "h1")
    await store.outbox.release_send("p1", "mailchimp", late)
    await store.outbox.settle_many("mailchimp", late, [("p1", "h1")], [], [])
    with pytest.raises(SyncBusy):
        await store.outbox.claim_send("p1", "mailchimp", timedelta(seconds=30))
    assert (await store.load("p1"))[1].esp["mailchimp"].sent_hash is None
    assert await store.outbox.mark_sent("p1", "mailchimp", holder, "h2")
    assert (await store.load("p1"))[1].esp["mailchimp"].sent_hash == "h2"


async def test_bulk_claims_are_exclusive_under_concurrency(store):
    import asyncio

    ids = [f"c{n}" for n in range(40)]
    for pid in ids:
        assert await store.save(person(pid, f"{pid}@example.com"), None, {"mailchimp": ({"m": pid}, f"h-{pid}")})
    claims = await asyncio.gather(*(store.outbox.claim_sends(ids, "mailchimp", timedelta(seconds=30)) for _ in range(6)))
    held = [pid for claimed, _ in claims for pid in claimed]
    assert sorted(held) == sorted(ids)  # every profile claimed exactly once


async def test_a_round_claims_every_free_pair_of_many_targets_in_two_round_trips_and_settles_them_in_one(store):
    members = {"mailchimp": ({"m": 1}, "h1"), "klaviyo": ({"k": 1}, "k1")}
    for pid in ("r1", "r2", "r3"):
        assert await store.save(person(pid, f"{pid}@example.com"), None, members)
    _, other = await store.outbox.claim_send("r2", "klaviyo", timedelta(seconds=30))  # another send holds one pair
    leases = {"mailchimp": timedelta(seconds=30), "klaviyo": timedelta(seconds=30)}
    store.outbox.profiles = recording = RecordingFilters(store.outbox.profiles)
    claimed = await store.outbox.claim_round({"mailchimp": ["r1", "r2", "nobody"], "klaviyo": ["r1", "r2", "r3"]}, leases)
    assert recording.calls == ["bulk_write", "find"]  # one write per profile in one bulk write, one read
    assert sorted(claimed.states) == [("klaviyo", "r1"), ("klaviyo", "r3"), ("mailchimp", "r1"), ("mailchimp", "r2")]
    assert claimed.busy == [("klaviyo", "r2")] and claimed.states["klaviyo", "r1"].member_hash == "k1"
    store.outbox.profiles = recording._profiles
    again = await store.outbox.claim_round({"mailchimp": ["r1"]}, leases)
    assert again.states == {} and again.busy == [("mailchimp", "r1")]  # leases are exclusive
    store.outbox.profiles = recording
    settlement = Settlement(claimed.token)
    settlement.add("mailchimp", sent=[("r1", "h1")], failed=[("r2", "h1", "esp_rejected")])
    settlement.add("klaviyo", sent=[("r1", "k1"), ("r2", "k1")], released=["r3"])
    before = len(recording.filters)
    await store.outbox.settle(settlement)
    assert recording.calls == ["bulk_write", "find", "bulk_write"]
    assert sorted(f["_id"] for f in recording.filters[before:]) == ["r1", "r2", "r3"]  # one document write per profile
    r1, r2, r3 = [(await store.load(pid))[1].esp for pid in ("r1", "r2", "r3")]
    assert r1["mailchimp"].sent_hash == "h1" and r1["klaviyo"].sent_hash == "k1" and not r1["mailchimp"].pending
    assert r2["mailchimp"].failed_code == "esp_rejected" and r2["mailchimp"].sending_until is None
    assert r2["klaviyo"].sent_hash is None and r2["klaviyo"].sending_token == other  # not the round's to record
    assert r3["klaviyo"].pending and r3["klaviyo"].sending_until is None
    assert [f for f in recording.filters if any(key.startswith("$") for key in f)] == []


async def test_a_round_of_one_profile_claims_its_targets_in_one_round_trip(store):
    """The targets of one change share one message, so one round: a single find-and-modify takes every free lease."""
    members = {"mailchimp": ({"m": 1}, "h1"), "klaviyo": ({"k": 1}, "k1")}
    assert await store.save(person("o1", "o1@example.com"), None, members)
    _, other = await store.outbox.claim_send("o1", "klaviyo", timedelta(seconds=30))
    leases = {"mailchimp": timedelta(seconds=30), "klaviyo": timedelta(seconds=30)}
    store.outbox.profiles = recording = RecordingFilters(store.outbox.profiles)
    claimed = await store.outbox.claim_round({"mailchimp": ["o1"], "klaviyo": ["o1"]}, leases)
    assert recording.calls == ["find_one_and_update"]
    assert list(claimed.states) == [("mailchimp", "o1")] and claimed.states["mailchimp", "o1"].member_hash == "h1"
    assert claimed.busy == [("klaviyo", "o1")]
    assert (await store.outbox.claim_round({"mailchimp": ["nobody"]}, leases)).states == {}
    store.outbox.profiles = recording._profiles
    assert (await store.load("o1"))[1].esp["klaviyo"].sending_token == other  # the held lease untouched


async def test_a_round_takes_the_leases_of_what_the_merge_handed_over_in_one_write_and_reads_only_where_it_moved_on(store):
    """A merge hands the members it wrote to the sync: their leases are taken without a read, in the write that
    carries the records waiting for a ride, only where the stored state is exactly that — never a member replaced
    since, one the ESP holds already, one with address work, or one whose lease another send holds."""
    members = {"mailchimp": ({"m": 1}, "h1"), "klaviyo": ({"k": 1}, "k1")}
    for pid in ("same", "replaced", "held", "work", "busy", "rider"):
        assert await store.save(person(pid, f"{pid}@example.com"), None, members)
    await store.profiles.update_one({"_id": "replaced"}, {"$set": {"esp.klaviyo.member": {"k": 2}, "esp.klaviyo.member_hash": "k2"}})
    await store.profiles.update_one({"_id": "held"}, {"$set": {"esp.mailchimp.sent_hash": "h1"}})
    await store.profiles.update_one({"_id": "work"}, {"$set": {"esp.klaviyo.retire": ["old@example.com"]}})
    _, other = await store.outbox.claim_send("busy", "mailchimp", timedelta(seconds=30))
    leases = {"mailchimp": timedelta(seconds=30), "klaviyo": timedelta(seconds=30)}
    riding = await store.outbox.claim_round({"mailchimp": ["rider"]}, leases)
    rider = Settlement(riding.token)
    rider.add("mailchimp", sent=[("rider", "h1")])
    handed = {esp: Expected(member, digest, T) for esp, (member, digest) in members.items()}
    store.outbox.profiles = recording = RecordingFilters(store.outbox.profiles)
    claimed, left = await store.outbox.claim_expected({pid: handed for pid in ("same", "replaced", "held", "work", "busy")}, leases, [rider])
    assert recording.calls == ["bulk_write", "find"]  # the read only because some did not match
    assert left == ["replaced", "held", "work", "busy"]
    assert sorted(claimed.states) == [("klaviyo", "same"), ("mailchimp", "same")]
    assert claimed.states["klaviyo", "same"].member == {"k": 1} and claimed.states["klaviyo", "same"].sending_token == claimed.token
    store.outbox.profiles = recording._profiles
    stored = {pid: (await store.load(pid))[1].esp for pid in ("same", "replaced", "held", "work", "busy", "rider")}
    assert all(stored["same"][esp].sending_token == claimed.token for esp in members)
    assert all(stored[pid][esp].sending_token != claimed.token for pid in left for esp in members)
    assert stored["busy"]["mailchimp"].sending_token == other  # the held lease untouched
    assert stored["rider"]["mailchimp"].sent_hash == "h1" and stored["rider"]["mailchimp"].sending_until is None  # rode the write
    # What was left is claimed by reading, under the same token; the replaced member is the one read.
    read = await store.outbox.claim_round({"klaviyo": ["replaced"]}, leases, token=claimed.token)
    assert read.token == claimed.token and read.states["klaviyo", "replaced"].member == {"k": 2}
    assert await store.save(person("fresh", "fresh@example.com"), None, members)
    store.outbox.profiles = recording = RecordingFilters(store.outbox.profiles)
    claimed, left = await store.outbox.claim_expected({"fresh": handed}, leases)
    assert recording.calls == ["bulk_write"] and left == [] and len(claimed.states) == 2  # all matched: one round trip
    store.outbox.profiles = recording._profiles


async def test_a_changes_targets_are_recorded_in_one_document_write_each_target_only_under_its_own_lease(store):
    """A job's note and other targets' records of one profile, in one bulk write, are one update of its
    document: each target's part applies only where its own token holds that target's lease."""
    members = {"mailchimp": ({"m": 1}, "h1"), "klaviyo": ({"k": 1}, "k1"), "sendgrid": ({"s": 1}, "s1")}
    assert await store.save(person("c1", "c1@example.com"), None, members)
    for esp in ("mailchimp", "sendgrid"):
        await store.outbox.claim_pending(esp, timedelta(0), timedelta(seconds=60))  # stamps swept_at, which a send clears
    _, other = await store.outbox.claim_send("c1", "klaviyo", timedelta(seconds=30))  # another send holds one target
    claimed = await store.outbox.claim_round({esp: ["c1"] for esp in members}, {esp: timedelta(seconds=30) for esp in members})
    assert claimed.busy == [("klaviyo", "c1")]
    early = Settlement(claimed.token)
    early.add("mailchimp", sent=[("c1", "h1")])
    early.add("klaviyo", failed=[("c1", "k1", "esp_rejected")])  # not this token's to record
    store.outbox.profiles = recording = RecordingFilters(store.outbox.profiles)
    await store.outbox.note_job("sendgrid", claimed.token, "job-1", ["c1"], [early])
    await store.outbox.note_job("sendgrid", claimed.token, "job-1", ["c1"])  # a repeat adds nothing
    assert recording.calls == ["bulk_write", "bulk_write"] and recording.filters == [{"_id": "c1", "merged_into": {"$exists": False}},
                                                                         records.owned("c1", "sendgrid", claimed.token)]
    store.outbox.profiles = recording._profiles
    esp = (await store.load("c1"))[1].esp
    assert esp["mailchimp"].sent_hash == "h1" and not esp["mailchimp"].pending and esp["mailchimp"].sending_until is None
    assert esp["klaviyo"].failed_code is None and esp["klaviyo"].sending_token == other and esp["klaviyo"].pending
    assert esp["sendgrid"].jobs == ["job-1"] and esp["sendgrid"].sending_token == claimed.token and esp["sendgrid"].pending
    doc = await store.profiles.find_one({"_id": "c1"})
    assert "swept_at" not in doc["esp"]["mailchimp"] and "swept_at" in doc["esp"]["sendgrid"]  # the $unset, guarded too


async def test_a_profile_merged_into_another_gets_no_record_of_a_round(store):
    """Its pointer keeps no sync state: one update of several targets' records (guarded inside the update, not
    by the filter) must not write to it."""
    members = {"mailchimp": ({"m": 1}, "h1"), "klaviyo": ({"k": 1}, "k1")}
    for pid in ("keep", "gone"):
        assert await store.save(person(pid, f"{pid}@example.com"), None, members)
    claimed = await store.outbox.claim_round({esp: ["gone"] for esp in members}, {esp: timedelta(seconds=30) for esp in members})
    profile, meta = await store.load("keep")
    assert await store.absorb(profile, meta.version, [("gone", 1)], members, {}, {})  # "gone" is a pointer now
    late = Settlement(claimed.token)
    late.add("mailchimp", sent=[("gone", "h1")])
    late.add("klaviyo", released=["gone"])
    await store.outbox.settle(late)
    doc = await store.profiles.find_one({"_id": "gone"})
    assert doc["merged_into"] == "keep" and "esp" not in doc


class LosingAnswers:
    """The profiles collection of a store that goes down under a send: the next ``lost`` writes are applied
    but their answers never arrive (as when the server stops right after applying them), and the
    ``unanswered`` writes after those fail before reaching it (the server is not back yet)."""

    def __init__(self, profiles, lost: int = 1, unanswered: int = 0) -> None:
        self._profiles, self.lost, self.unanswered = profiles, lost, unanswered

    def __getattr__(self, name):
        return getattr(self._profiles, name)

    async def _write(self, name: str, *args, **kwargs):
        if self.lost:
            self.lost -= 1
            await getattr(self._profiles, name)(*args, **kwargs)
            raise AutoReconnect("connection closed")
        if self.unanswered:
            self.unanswered -= 1
            raise AutoReconnect("connection refused")
        return await getattr(self._profiles, name)(*args, **kwargs)

    async def update_many(self, *args, **kwargs):
        return await self._write("update_many", *args, **kwargs)

    async def find_one_and_update(self, *args, **kwargs):
        return await self._write("find_one_and_update", *args, **kwargs)

    async def bulk_write(self, *args, **kwargs):
        return await self._write("bulk_write", *args, **kwargs)


async def test_a_claim_whose_answer_was_lost_leaves_no_lease_behind(store):
    """The storm: SecantusDB stopped right after a batch claimed its profiles; nobody knew the claim's
    token, and every sync of those profiles found them busy until the batch lease ran out (325 s)."""
    ids = [f"s{n}" for n in range(3)]
    for pid in ids:
        assert await store.save(person(pid, f"{pid}@example.com"), None, {"mailchimp": ({"m": pid}, f"h-{pid}")})
    profiles = store.outbox.profiles
    store.outbox.profiles = LosingAnswers(profiles, lost=1, unanswered=2)  # the release waits for the store to be back
    with pytest.raises(AutoReconnect):
        await store.outbox.claim_sends(ids, "mailchimp", timedelta(seconds=300))
    store.outbox.profiles = LosingAnswers(profiles, lost=1)
    with pytest.raises(AutoReconnect):
        await store.outbox.claim_send("s0", "mailchimp", timedelta(seconds=300))
    store.outbox.profiles = profiles
    claimed, _ = await store.outbox.claim_sends(ids, "mailchimp", timedelta(seconds=300))
    assert sorted(claimed) == ids


async def test_profiles_without_a_member_are_never_pending(store):
    assert await store.save(person("p1", None, anonymous="a1"), None, {"mailchimp": (None, None)})
    profile, meta = await store.load("p1")
    assert meta.esp["mailchimp"].pending is False
    assert await store.save(profile.model_copy(update={"traits": {}}), meta.version, {"mailchimp": (None, None)})
    assert (await store.load("p1"))[1].esp["mailchimp"].pending is False
    assert await store.outbox.claim_pending("mailchimp", timedelta(0), timedelta(0)) == []


async def test_identifiers_are_indexed_by_keyed_hashes_and_older_profiles_are_rekeyed_once(store):
    assert await store.save(person("p1", "a@example.com", shopify="1"), None, {"mailchimp": (None, None)})
    raw = await store.profiles.find_one({"_id": "p1"})
    assert "a@example.com" not in str(raw["keys"]) and all(k.startswith("h:") for k in raw["keys"])
    other_secret = ProfileStore(store.client, store.profiles.database.name, type(HASHER)((b"another-secret-0123456789",)))
    assert await other_secret.find_owners(["email:a@example.com"]) == []  # without the secret, nobody finds (or computes) them
    # A profile written before keyed hashes: indexed by plain identifiers until rekeyed.
    await store.profiles.insert_one({"_id": "p2", "email": "b@example.com", "identifiers": {"email": ["b@example.com"]},
                                     "keys": ["email:b@example.com"], "version": 1, "esp": {}})
    assert await store.unhashed_left() and await store.find_owners(["email:b@example.com"]) == []
    assert await store.rekey() == 1 and await store.rekey() == 0
    assert not await store.unhashed_left()
    assert [p.id for p, _ in await store.find_owners(["email:b@example.com"])] == ["p2"]


async def test_batch_writes_know_their_own_and_leave_nothing_behind_in_a_pointer(store):
    from adapters.store.writes import Save

    a, b = person("pa", "pa@example.com"), person("pb", "pb@example.com")
    assert await store.save_many([Save(a, None, {"mailchimp": ({"m": 1}, "h1")}), Save(b, None, {"mailchimp": ({"m": 2}, "h2")})]) == [True, True]
    (_, stored_a), (_, stored_b) = await store.load("pa"), await store.load("pb")
    renamed = a.model_copy(update={"traits": {}})
    # A stale version loses (and says so), the current one wins, in the same bulk write.
    results = await store.save_many([Save(renamed, stored_a.version, {"mailchimp": ({"m": 3}, "h3")}, stored=stored_a, before=a),
                                     Save(b, stored_b.version + 5, {"mailchimp": ({"m": 4}, "h4")}, stored=stored_b, before=b)])
    assert results == [True, False]
    # Saves that give profiles new identifiers claim them first, in one bulk write, then write as before.
    (_, stored_a), (_, stored_b) = await store.load("pa"), await store.load("pb")
    results = await store.save_many([Save(person("pa", "pa@example.com", shopify="7"), stored_a.version, {"mailchimp": ({"m": 3}, "h3")},
                                          stored=stored_a, before=renamed),
                                     Save(person("pb", "pb@example.com", shopify="8"), stored_b.version + 5, {"mailchimp": ({"m": 4}, "h4")},
                                          stored=stored_b, before=b)])
    assert results == [True, False]
    assert [p.id for p, _ in await store.find_owners(["shopify:7"])] == ["pa"] and await store.find_owners(["shopify:8"]) == []
    # The loser's claim stays its own (its merge is done again and writes it); nobody else takes it.
    assert {d["_id"] async for d in store.identities.collection.find({"profile": "pb"})} == {*store.index(b), *HASHER.index_keys("shopify:8")}
    assert not await store.save(person("px", "px@example.com", shopify="8"), None, {"mailchimp": (None, None)})
    assert "written_by" in await store.profiles.find_one({"_id": "pa"})
    (survivor, stored_b), (_, stored_a) = await store.load("pb"), await store.load("pa")
    both = survivor.model_copy(update={"merged_from": ("pa",)})
    assert await store.absorb(both, stored_b.version, [("pa", stored_a.version)], {"mailchimp": ({"m": 5}, "h5")}, {}, {})
    pointer = await store.profiles.find_one({"_id": "pa"})
    assert set(pointer) == {"_id", "merged_into", "keys", "merged_at", "version"}


async def test_a_bulk_job_the_esp_accepted_is_recorded_once_the_store_is_back(store):
    """The storm: the store went down just as the ESP accepted a bulk job; recording the job id gave up,
    so an erasure would not have waited for a job still writing the person."""
    ids = [f"j{n}" for n in range(3)]
    for pid in ids:
        assert await store.save(person(pid, f"{pid}@example.com"), None, {"mailchimp": ({"m": pid}, f"h-{pid}")})
    claimed, token = await store.outbox.claim_sends(ids, "mailchimp", timedelta(seconds=300))
    profiles = store.outbox.profiles
    store.outbox.profiles = LosingAnswers(profiles, lost=1, unanswered=3)
    await store.outbox.note_job("mailchimp", token, "job-1", ids)
    store.outbox.profiles = profiles
    for pid in ids:
        doc = await profiles.find_one({"_id": pid}, {"esp.mailchimp.jobs": 1})
        assert doc["esp"]["mailchimp"]["jobs"] == ["job-1"]  # recorded, and only once though written twice


class RecordingFilters:
    """The profiles collection, noting the filter of every call the sync makes."""

    def __init__(self, profiles) -> None:
        self._profiles, self.filters, self.calls = profiles, [], []

    def __getattr__(self, name):
        method = getattr(self._profiles, name)
        if name not in {"find", "find_one", "find_one_and_update", "update_one", "count_documents", "bulk_write"}:
            return method

        def recorded(*args, **kwargs):
            self.calls.append(name)
            if name == "bulk_write":
                self.filters += [op._filter for op in args[0]]
            else:
                self.filters.append(args[0] if args else kwargs.get("filter", {}))
            return method(*args, **kwargs)

        return recorded


async def test_the_sync_filters_the_store_by_index_only(store):
    """No filter of the sync's hot path has a top-level operator (``$or``, ``$expr``): SecantusDB plans
    none of those on an index and scans every profile under its lock, once per document of a bulk
    write — which starved the sync as soon as there were thousands of profiles."""
    ids = [f"x{n}" for n in range(4)]
    for pid in ids:
        assert await store.save(person(pid, f"{pid}@example.com"), None, {"mailchimp": ({"m": pid}, f"h-{pid}")})
    store.outbox.profiles = recording = RecordingFilters(store.outbox.profiles)
    assert await store.outbox.count_pending("mailchimp", cap=10) == 4
    assert sorted(await store.outbox.claim_pending("mailchimp", timedelta(0), timedelta(seconds=60))) == ids
    claimed, token = await store.outbox.claim_sends(ids[:2], "mailchimp", timedelta(seconds=60))
    await store.outbox.note_job("mailchimp", token, "job", list(claimed))
    await store.outbox.settle_many("mailchimp", token, [(pid, f"h-{pid}") for pid in claimed], [], [], ["job"])
    state, token = await store.outbox.claim_send(ids[2], "mailchimp", timedelta(seconds=60))
    assert await store.outbox.mark_sent(ids[2], "mailchimp", token, state.member_hash)
    assert await store.outbox.pending_ids("mailchimp", limit=10) == [ids[3]]
    assert recording.filters
    assert [f for f in recording.filters if any(key.startswith("$") for key in f)] == []


class Commands(monitoring.CommandListener):
    """Every command a client sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def started(self, event) -> None:
        self.sent.append((event.command_name, dict(event.command)))

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


WRITES = {"insert", "update", "delete", "findAndModify"}


async def test_writes_are_majority_journaled_transactions_majority_and_every_profile_write_names_its_shard_key(mongo_uri):
    """On a replica set an acknowledged write survives a failover; on a sharded cluster (shard key: hashed
    ``_id``) every write of a profile goes to one shard — merges, absorbs and the sync's bookkeeping alike."""
    listener = Commands()
    store = ProfileStore.connect(mongo_uri, "dur" + uuid.uuid4().hex[:8], HASHER, event_listeners=[listener])
    try:
        await store.ensure_indexes()
        assert await store.save(person("a", "a@example.com"), None, {"mailchimp": ({"m": "a"}, "ha")})
        assert await store.save(person("b", "b@example.com"), None, {"mailchimp": ({"m": "b"}, "hb")})
        profile, meta = await store.load("a")
        assert await store.absorb(profile, meta.version, [("b", 1)], {"mailchimp": ({"m": "ab"}, "hab")}, {}, {})
        claimed, token = await store.outbox.claim_sends(["a"], "mailchimp", timedelta(seconds=60))
        await store.outbox.settle_many("mailchimp", token, [("a", "hab")], [], [])
        profile, meta = await store.load("a")
        assert await store.save(profile.model_copy(update={"email": "a2@example.com"}), meta.version, {"mailchimp": ({"m": "g"}, "hg")})
        state, token = await store.outbox.claim_send("a", "mailchimp", timedelta(seconds=60))
        assert await store.outbox.mark_sent("a", "mailchimp", token, state.member_hash)
    finally:
        await store.client.drop_database(store.profiles.database.name)
        await store.close()

    writes = [(name, command) for name, command in listener.sent if name in WRITES and command.get(name) == "profiles"]
    assert writes
    in_transaction = [command for _, command in listener.sent if command.get("autocommit") is False]
    assert in_transaction and in_transaction[0]["readConcern"]["level"] == "majority"
    commits = [command for name, command in listener.sent if name == "commitTransaction"]
    assert commits and all(c["writeConcern"] == {"w": "majority", "j": True} for c in commits)
    for name, command in writes:
        if command.get("autocommit") is not False:
            assert command["writeConcern"] == {"w": "majority", "j": True}, (name, command.get("writeConcern"))
        targets = {"insert": lambda c: [d for d in c["documents"]], "update": lambda c: [u["q"] for u in c["updates"]],
                   "delete": lambda c: [d["q"] for d in c["deletes"]], "findAndModify": lambda c: [c["query"]]}[name](command)
        assert all("_id" in target for target in targets), (name, targets)


async def test_an_identifier_belongs_to_one_profile_without_a_unique_index_over_profiles(store):
    """What a sharded cluster needs: profiles carry no unique index but ``_id`` (MongoDB refuses one not
    prefixed by the shard key, hashed ``_id``); identity claims keyed by identity key keep an identifier
    on one profile, even when creators race."""
    await store.ensure_indexes()
    indexes = [index async for index in await store.profiles.list_indexes()]
    assert [i["name"] for i in indexes if i.get("unique")] == [] and "identity_lookup" in {i["name"] for i in indexes}

    assert await store.save(person("p1", "a@example.com", phone="+1"), None, {"mailchimp": (None, None)})
    assert not await store.save(person("p2", "b@example.com", phone="+1"), None, {"mailchimp": (None, None)})
    assert await store.profiles.find_one({"_id": "p2"}) is None  # lost, and nothing of it written
    assert {d["profile"] async for d in store.identities.collection.find({})} == {"p1"}

    racers = [person(f"r{n}", f"r{n}@example.com", shopify="same") for n in range(8)]
    results = await asyncio.gather(*(store.save(p, None, {"mailchimp": (None, None)}) for p in racers))
    owners = [p.id for p, _ in await store.find_owners(["shopify:same"])]
    assert sum(results) <= 1 and len(owners) == sum(results)
    assert owners == [p.id for p, ok in zip(racers, results) if ok]
    assert await store.profiles.count_documents({"_id": {"$in": [p.id for p in racers]}}) == sum(results)

    # Absorbing hands the absorbed profile's identifiers to the survivor; an erasure's tombstone takes them.
    profile, meta = await store.load("p1")
    assert await store.save(person("p3", "c@example.com"), None, {"mailchimp": (None, None)})
    _, meta3 = await store.load("p3")
    both = profile.model_copy(update={"identifiers": {**profile.identifiers, "email": ("a@example.com", "c@example.com")}, "merged_from": ("p3",)})
    assert await store.absorb(both, meta.version, [("p3", meta3.version)], {"mailchimp": (None, None)}, {}, {})
    assert {d["profile"] async for d in store.identities.collection.find({"_id": {"$in": store.index(both)}})} == {"p1"}
    assert not await store.save(person("p4", "c@example.com"), None, {"mailchimp": (None, None)})


async def test_profiles_written_before_identity_claims_are_claimed_by_rekey_once(store):
    """An older deployment: profiles indexed by a unique index over their keys, no claims. Workers refuse
    to start until ``mergetag profile rekey`` claims every key, then the unique index is dropped."""
    await store.profiles.create_index([("keys", 1)], name="identity_keys", unique=True)
    keys = sorted(HASHER.index_key(k) for k in ("email:old@example.com",))
    await store.profiles.insert_one({"_id": "old", "email": "old@example.com", "identifiers": {"email": ["old@example.com"]},
                                     "keys": keys, "version": 1, "esp": {}})
    assert await store.unclaimed_left()
    assert await store.rekey() == 0 and await store.rekey() == 0
    assert not await store.unclaimed_left()
    assert [d async for d in store.identities.collection.find({})] == [{"_id": keys[0], "profile": "old", "at": None}]
    assert "identity_keys" not in {i["name"] async for i in await store.profiles.list_indexes()}
    assert not await store.save(person("new", "old@example.com"), None, {"mailchimp": (None, None)})


async def test_a_claim_whose_write_never_happened_is_taken_over_once_no_write_can_still_land(store):
    """A process died between claiming an identifier and writing its profile: a young claim still wins
    (its write may be in flight); one older than any write can take, whose profile lacks the key, is an
    orphan the next claimant takes."""
    from adapters.store.durability import ORPHAN_AFTER

    key = HASHER.index_key("email:orphan@example.com")
    await store.identities.collection.insert_one({"_id": key, "profile": "ghost", "at": datetime.now(timezone.utc)})
    assert not await store.save(person("heir", "orphan@example.com"), None, {"mailchimp": (None, None)})
    await store.identities.collection.update_one({"_id": key}, {"$set": {"at": datetime.now(timezone.utc) - ORPHAN_AFTER - timedelta(seconds=1)}})
    assert await store.save(person("heir", "orphan@example.com"), None, {"mailchimp": (None, None)})
    assert (await store.identities.collection.find_one({"_id": key}))["profile"] == "heir"
    # An old claim whose profile does hold the key is no orphan.
    await store.identities.collection.update_one({"_id": key}, {"$set": {"at": datetime.now(timezone.utc) - 2 * ORPHAN_AFTER}})
    assert not await store.save(person("usurper", "orphan@example.com"), None, {"mailchimp": (None, None)})
    assert [p.id for p, _ in await store.find_owners(["email:orphan@example.com"])] == ["heir"]
