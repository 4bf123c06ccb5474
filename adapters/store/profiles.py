"""The MongoDB profile store, through PyMongo's asyncio API.

Common path per event: one indexed lookup of the identity's keys and one conditional write
guarded by ``version`` (optimistic concurrency). A profile's write also records, per ESP target,
the member it should become (the rest of the sync state is the outbox's, :mod:`adapters.store.outbox`).

An identifier belongs to one profile through its claim (:mod:`adapters.store.identities`): a write
that gives a profile keys it did not hold claims them first (one bulk upsert) and loses the race when
another profile holds one; writes that add no identifier, the common case, claim nothing. Absorbing
and erasing move claims inside their transactions.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pymongo import ASCENDING, AsyncMongoClient, InsertOne, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import BulkWriteError

from adapters.store.durability import DURABLE, ORPHAN_AFTER, Abort, lost, transaction
from adapters.store.identities import IDENTITIES, Identities
from adapters.store.outbox import PROFILES, Members, Outbox, Work, carry
from adapters.store.writes import Save, profile_write, split_doc
from schemas.profile import ERASED, IdentityHasher, Profile, profile_keys
from schemas.sync import NEW, InFlight, Stored

if TYPE_CHECKING:
    from collections.abc import Iterable

    from adapters.redis.feed_cache import FeedWrites
    from workers.profiles.erasure import ErasurePlan

ERASURES = "erasures"
LOOKUP_SLICE = 64
"""Identity keys per lookup of a merge round."""
# What a profile document holds about the person: removed from tombstones (which keep hashed identifiers
# and absorbed ids instead), and, with everything else, from pointers.
PERSONAL = tuple(name for name in Profile.model_fields if name not in {"id", "schema_version", "erased", "identifiers", "merged_from"})
POINTER_DROPS = tuple(name for name in Profile.model_fields if name != "id")
BOOKKEEPING = ("written_by",)
"""What a batch write leaves on a profile besides the profile: gone with the profile when it becomes
a pointer or a tombstone."""


class ProfileStore:
    """Profiles, and (through :attr:`outbox`) their per-ESP sync state.

    Parameters:
      client: an ``AsyncMongoClient`` created with ``tz_aware=True``.
      database: database name.
      hasher: how identity keys are indexed (keyed hashes); needed to find or write profiles by
        identifier, not to read or sync them by id.
    """

    def __init__(self, client: AsyncMongoClient, database: str, hasher: IdentityHasher | None = None) -> None:
        self.client = client
        self.profiles = client[database][PROFILES]
        self.identities = Identities(client[database][IDENTITIES], self.profiles, ORPHAN_AFTER)
        self.outbox = Outbox(client, database)
        self._hasher = hasher
        self.feed: FeedWrites | None = None
        """The feed cache's hooks around every profile write (set by the workers' runtime)."""

    @classmethod
    def connect(cls, uri: str, database: str, hasher: IdentityHasher | None = None, **client_options: Any) -> ProfileStore:
        """A store on its own client, durable on a replica set: what the URI does not set is :data:`DURABLE`.

        Every operation has a time limit (``timeoutMS``): without one, an operation the server never
        answers (a write conflict it retries without end, a lost connection it does not notice) holds
        its message forever; with one it fails, retryably.
        """
        options: dict[str, Any] = {"tz_aware": True, "serverSelectionTimeoutMS": 5_000, **client_options}
        given = uri.lower()
        options.update({name: value for name, value in DURABLE.items() if f"{name.lower()}=" not in given})
        return cls(AsyncMongoClient(uri, **options), database, hasher)

    @property
    def hasher(self) -> IdentityHasher:
        if self._hasher is None:
            raise ValueError("this store was opened without an identity hasher: it cannot find profiles by identifier")
        return self._hasher

    def index(self, profile: Profile) -> list[str]:
        """The profile's keys in the unique index: the keyed hash of every identifier (a tombstone keeps
        nothing else, so its keys are those hashes as they are)."""
        if profile.erased is not None:
            return list(profile.identifiers.get(ERASED, ()))
        return sorted({self.hasher.index_key(key) for key in profile_keys(profile)})

    async def close(self) -> None:
        await self.client.close()

    async def flag_counts(self) -> dict[str, dict[str, int]]:
        """Per data-quality flag: how many profiles carry it, and how many (kept) events raised it."""
        pipeline = [
            {"$project": {"flags": {"$objectToArray": {"$ifNull": ["$flags", {}]}}}},
            {"$unwind": "$flags"},
            {"$group": {"_id": "$flags.k", "profiles": {"$sum": 1}, "events": {"$sum": {"$size": "$flags.v"}}}},
        ]
        return {d["_id"]: {"profiles": d["profiles"], "events": d["events"]} async for d in await self.profiles.aggregate(pipeline)}

    async def ensure_indexes(self, esps: tuple[str, ...] = ("mailchimp",)) -> None:
        # Not unique: an identifier's one owner is its claim in ``identities`` (keyed by the identity key),
        # which a sharded cluster can enforce; this index only finds profiles by identifier.
        await self.profiles.create_index([("keys", ASCENDING)], name="identity_lookup")
        for esp in esps:
            await self.profiles.create_index(
                [(f"esp.{esp}.pending", ASCENDING), (f"esp.{esp}.dirty_at", ASCENDING)], name=f"{esp}_pending"
            )

    async def unhashed_left(self) -> bool:
        """Whether profiles written before identifiers were indexed by keyed hashes are still indexed by
        plain ones (they would be found by nothing): ``mergetag profile rekey`` fixes that, once."""
        return await self.profiles.find_one({"keys": {"$regex": "^(email|phone):"}}, {"_id": 1}) is not None

    async def unclaimed_left(self) -> bool:
        """Whether profiles written before identity claims exist while no claim does: ``mergetag profile
        rekey`` claims their keys, once (without claims, two profiles could take one identifier)."""
        if await self.identities.any():
            return False
        return await self.profiles.find_one({"merged_into": {"$exists": False}}, {"_id": 1}) is not None

    async def rekey(self) -> int:
        """Index every live profile by the keyed hashes of its identifiers and claim every key of every
        live profile and tombstone (idempotent); returns how many profiles changed their keys. Then drops
        the unique index over profiles' keys that claims replace (a sharded cluster refuses it)."""
        changed = 0
        async for doc in self.profiles.find({"merged_into": {"$exists": False}}):
            found = split_doc(dict(doc))
            if found is None:
                continue
            keys = self.index(found[0])
            if sorted(doc.get("keys", [])) != keys:
                await self.profiles.update_one({"_id": doc["_id"], "version": doc["version"]}, {"$set": {"keys": keys}})
                changed += 1
            await self.identities.backfill(doc["_id"], keys)
        if "identity_keys" in {index["name"] async for index in await self.profiles.list_indexes()}:
            await self.profiles.drop_index("identity_keys")
        return changed

    async def load(self, profile_id: str) -> tuple[Profile, Stored] | None:
        """Load a profile, following the pointer an absorbed profile leaves behind."""
        for _ in range(10):
            doc = await self.profiles.find_one({"_id": profile_id})
            if doc is None or "merged_into" not in doc:
                return split_doc(doc)
            profile_id = doc["merged_into"]
        return None

    async def find_by_keys(self, keys: list[str]) -> tuple[Profile, Stored] | None:
        """The profile owning any of ``keys`` (the first key's owner when several do)."""
        owners = await self.find_owners(keys)
        return owners[0] if owners else None

    async def find_owners(self, keys: list[str]) -> list[tuple[Profile, Stored]]:
        """Every profile owning one of identity keys ``keys`` (live ones and tombstones), ordered by the
        strongest key each owns. One round trip."""
        rank = {indexed: i for i, key in enumerate(keys) for indexed in self.hasher.index_keys(key)}
        docs = [doc async for doc in self.profiles.find({"keys": {"$in": list(rank)}}).limit(len(rank))]
        docs.sort(key=lambda d: (min(rank[k] for k in d["keys"] if k in rank), d["_id"]))
        return [split for doc in docs if (split := split_doc(doc)) is not None]

    async def owners_by_key(self, keys: list[str], targets: Iterable[str] = ()) -> dict[str, tuple[Profile, Stored]]:
        """The live profile or tombstone owning each of identity keys ``keys`` (those owned), for a whole
        batch of identities in one round trip; without the members last rendered for ``targets`` (a
        merge compares their hashes only: their bodies are most of a document)."""
        plain = {indexed: key for key in keys for indexed in self.hasher.index_keys(key)}
        indexed = list(plain)
        without = {f"esp.{target}.member": 0 for target in targets} or None
        # In slices, side by side: a server may match each document against the whole ``$in`` list
        # (SecantusDB does), so one list of thousands costs far more than a few short ones.
        found = await asyncio.gather(*(self.profiles.find({"keys": {"$in": indexed[i:i + LOOKUP_SLICE]}}, without,
                                                          batch_size=LOOKUP_SLICE + 1).to_list()
                                       for i in range(0, len(indexed), LOOKUP_SLICE)))
        owners: dict[str, tuple[Profile, Stored]] = {}
        for doc in {doc["_id"]: doc for docs in found for doc in docs}.values():
            held = [plain[k] for k in doc.get("keys", []) if k in plain]
            if (split := split_doc(doc)) is not None:
                owners.update({key: split for key in held})
        return owners

    async def absorb(self, survivor: Profile, version: int, absorbed: list[tuple[str, int]], members: Members,
                     work: Work, sent: dict[str, str | None], carried: dict[str, InFlight] | None = None) -> bool:
        """Merge profiles in one transaction: the absorbed become bare pointers to ``survivor``.

        A pointer keeps nothing of the person (the survivor holds it all now): only its id, where it
        points and a key of its own. Every write is version-guarded; any lost race aborts the whole
        merge (returns False).
        Parameters:
          members: per ESP target, the member the survivor should become and its hash.
          work: per ESP target, address lists to add: contacts of absorbed profiles to retire, so
            none is left orphaned, and addresses to unsubscribe.
          sent: per ESP target, the hash the survivor's contact was last sent.
          carried: per ESP target, the absorbed profiles' sends that may still be in flight: the
            survivor's address work (retiring their contacts, an erasure) waits for them.
        """
        body = survivor.model_dump(mode="python", exclude={"id"})
        body["keys"] = self.index(survivor)
        now = datetime.now(timezone.utc)
        state: dict[str, Any] = {}
        for esp, (member, member_hash) in members.items():
            prefix = f"esp.{esp}"
            state.update({f"{prefix}.member": member, f"{prefix}.member_hash": member_hash, f"{prefix}.dirty_at": now,
                          f"{prefix}.pending": (member is not None and member_hash != sent.get(esp)) or any(work.get(esp, {}).values())})
        if self.feed is not None:
            await self.feed.writing({survivor.id: version + 1, **{a: v + 1 for a, v in absorbed}})
        async with self.client.start_session() as session:
            try:
                async with transaction(session):
                    for absorbed_id, absorbed_version in absorbed:
                        if not await self._point(absorbed_id, survivor.id, now, session, version=absorbed_version):
                            raise Abort
                    await self.identities.claim_in(session, dict.fromkeys(body["keys"], survivor.id), takes_from=tuple(a for a, _ in absorbed))
                    update: dict[str, Any] = {"$set": {**body, **state}, "$inc": {"version": 1}}
                    jobs, until = carry(carried or {})
                    adding = {f"esp.{esp}.{name}": {"$each": sorted(emails)}
                              for esp, lists in work.items() for name, emails in lists.items() if emails}
                    if adding or jobs:
                        update["$addToSet"] = {**adding, **jobs}
                    if until:
                        update["$max"] = until
                    done = await self.profiles.update_one({"_id": survivor.id, "version": version}, update, session=session)
                    if done.matched_count != 1:
                        raise Abort
            except Exception as exc:
                if lost(exc):
                    # A lost race, or a third profile took one of the identifiers meanwhile: re-read and retry.
                    return False
                raise
        if self.feed is not None:
            await self.feed.written([self.feed.entry(survivor.id, version + 1, body["keys"], members),
                                     *(self.feed.entry(a, v + 1, (), {}, gone=True) for a, v in absorbed)])
        return True

    async def _point(self, profile_id: str, target: str, now: datetime, session: Any, version: int | None = None) -> bool:
        """Turn a profile into a bare pointer to ``target``: nothing of the person stays behind."""
        query: dict[str, Any] = {"_id": profile_id, **({"version": version} if version is not None else {})}
        done = await self.profiles.update_one(
            query,
            # Not []: a unique multikey index counts every empty array as the same key.
            {"$set": {"merged_into": target, "keys": [f"merged:{profile_id}"], "merged_at": now},
             "$unset": {**{name: "" for name in (*POINTER_DROPS, *BOOKKEEPING)}, "esp": ""}, "$inc": {"version": 1}},
            session=session,
        )
        return done.matched_count == 1

    async def erase(self, plan: ErasurePlan, targets: tuple[str, ...], receipt: dict[str, Any]) -> bool:
        """Make ``plan`` true in one transaction: the tombstone, pointers of the person's other profiles
        and of every profile absorbed into them (emptied), and the erasure's receipt.

        Each target's send lease is kept as it is: a send still in flight (a bulk job carrying the
        person) keeps it, and the erasure's own sync waits for it before it deletes anything.
        Returns False on a lost race.
        """
        now = datetime.now(timezone.utc)
        tomb = plan.tombstone
        body = {**tomb.model_dump(mode="python", exclude={"id"}), "keys": plan.keys}
        state: dict[str, Any] = {}
        for esp in targets:
            prefix = f"esp.{esp}"
            state.update({f"{prefix}.member": None, f"{prefix}.member_hash": None, f"{prefix}.pending": bool(plan.addresses),
                          f"{prefix}.urgent": bool(plan.addresses), f"{prefix}.dirty_at": now})
        unset = {**{name: "" for name in (*PERSONAL, *BOOKKEEPING) if name not in body},
                 **{f"esp.{esp}.{name}": "" for esp in targets for name in ("sent_hash", "failed_hash", "retire", "unsubscribe")}}
        update: dict[str, Any] = {"$set": {**body, **state}, "$unset": unset, "$inc": {"version": 1}}
        jobs, until = carry(plan.carried)
        erase = {f"esp.{esp}.erase": {"$each": list(plan.addresses)} for esp in targets} if plan.addresses else {}
        if erase or jobs:
            update["$addToSet"] = {**erase, **jobs}
        if until:
            update["$max"] = until
        receipts = self.profiles.database[ERASURES]
        if self.feed is not None:
            await self.feed.writing({tomb.id: (plan.version or 0) + 1, **{p: v + 1 for p, v in plan.pointers}})
        async with self.client.start_session() as session:
            try:
                async with transaction(session):
                    # Pointers first: they give up the keys the tombstone takes over (the index is unique).
                    for pointer_id, version in plan.pointers:
                        if not await self._point(pointer_id, tomb.id, now, session, version=version):
                            raise Abort
                    for absorbed_id in plan.absorbed:
                        await self._point(absorbed_id, tomb.id, now, session)
                    await self.identities.claim_in(session, dict.fromkeys(plan.keys, tomb.id), takes_from=(*(p for p, _ in plan.pointers), *plan.absorbed))
                    if plan.version is None:
                        fresh = {esp: {"member": None, "member_hash": None, "pending": bool(plan.addresses), "urgent": bool(plan.addresses),
                                       "dirty_at": now, "erase": list(plan.addresses)} for esp in targets}
                        for esp, f in plan.carried.items():
                            fresh.setdefault(esp, {}).update(jobs=list(f.jobs), fence_until=f.until)
                        await self.profiles.insert_one({"_id": tomb.id, **body, "version": 1, "esp": fresh}, session=session)
                    else:
                        done = await self.profiles.update_one({"_id": tomb.id, "version": plan.version}, update, session=session)
                        if done.matched_count != 1:
                            raise Abort
                    await receipts.update_one({"_id": plan.request_id}, receipt, upsert=True, session=session)
            except Exception as exc:
                if lost(exc):
                    return False
                raise
        if self.feed is not None:
            # The tombstone keeps the person's keys (hashed): a feed read by any of them finds it erased.
            await self.feed.written([self.feed.entry(tomb.id, (plan.version or 0) + 1, plan.keys, {}, gone=True),
                                     *(self.feed.entry(p, v + 1, (), {}, gone=True) for p, v in plan.pointers)])
        return True

    async def save(self, profile: Profile, version: int | None, members: Members, urgent: bool = False,
                   work: Work | None = None, stored: Stored = NEW, before: Profile | None = None) -> bool:
        """Write ``profile`` if nobody else has since ``version`` (None: it must be new).

        Also records, per ESP target, the member it should become (``members``: target ->
        (member, hash)), and marks it pending where that differs from what was last sent.
        ``work``: per target, addresses to add to its address lists (unsubscribe, retire).
        ``urgent``: a consent change, which the sweeper sends ahead of any backlog. ``stored``: the
        sync state read with ``version``, ``before`` the profile (then only what changed is written).
        Returns False on a lost race.
        """
        keys = self.index(profile)
        guard, write = profile_write(Save(profile, version, members, urgent, work or {}, stored, before), keys)
        if self.feed is not None:
            await self.feed.writing({profile.id: (version or 0) + 1})
        if await self.identities.claim(dict.fromkeys(self._unclaimed(keys, before), profile.id)):
            return False  # another profile holds one of these identifiers: re-read, and the merge finds it
        try:
            await self._write(guard, write)
        except Exception as exc:
            if lost(exc):
                return False  # another worker wrote the profile since: re-read and merge again
            raise
        if self.feed is not None:
            await self.feed.written([self.feed.entry(profile.id, (version or 0) + 1, keys, members)])
        return True

    async def _write(self, guard: dict[str, Any] | None, write: Any, session: AsyncClientSession | None = None) -> None:
        """One profile's insert, or its version-guarded update (:class:`Abort` when the guard misses)."""
        if guard is None:
            await self.profiles.insert_one(write, session=session)
        elif (await self.profiles.update_one(guard, write, session=session)).matched_count != 1:
            raise Abort

    def _unclaimed(self, keys: list[str], before: Profile | None) -> list[str]:
        """The keys a write gives its profile that it did not hold when read: those it must claim."""
        held = set(self.index(before)) if before is not None else set()
        return [k for k in keys if k not in held]

    async def save_many(self, saves: list[Save]) -> list[bool]:
        """:meth:`save` for many profiles in one unordered bulk write (plus one read when some lost a race).

        Returns, per save, whether it was written. An update is known to be ours by the batch's token,
        written with it: one that nobody else overwrote since is certainly ours; one overwritten since
        counts as lost, and its merge is simply done again (merges are idempotent).
        """
        if not saves:
            return []
        keys = [self.index(save.profile) for save in saves]
        if self.feed is not None:
            await self.feed.writing({save.profile.id: (save.version or 0) + 1 for save in saves})
        claims = {k: save.profile.id for save, held in zip(saves, keys, strict=True)
                  for k in self._unclaimed(held, save.before if save.version is not None else None)}
        lost = await self.identities.claim(claims)
        written = [save.profile.id not in lost for save in saves]
        kept = [i for i, ok in enumerate(written) if ok]
        for i, ok in zip(kept, await self._save_plain([saves[i] for i in kept], [keys[i] for i in kept]), strict=True):
            written[i] = ok
        if self.feed is not None:
            await self.feed.written([self.feed.entry(save.profile.id, (save.version or 0) + 1, k, save.members)
                                     for save, k, ok in zip(saves, keys, written, strict=True) if ok])
        return written

    async def _save_plain(self, saves: list[Save], keys: list[list[str]]) -> list[bool]:
        """The profile writes of :meth:`save_many`, their claims made: one unordered bulk write.

        An update is known to be ours by the batch's token, written with it: one that nobody else
        overwrote since is certainly ours; one overwritten since counts as lost, and its merge is simply
        done again (merges are idempotent).
        """
        if not saves:
            return []
        token = uuid.uuid4().hex
        writes = [profile_write(save, k, token) for save, k in zip(saves, keys, strict=True)]
        updates = [guard is not None for guard, _ in writes]
        failed: set[int] = set()
        try:
            result = await self.profiles.bulk_write([InsertOne(doc) if guard is None else UpdateOne(guard, doc) for guard, doc in writes],
                                                    ordered=False)
            if result.matched_count == sum(updates):
                return [True] * len(saves)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != 11000 for e in errors):
                raise
            failed = {e["index"] for e in errors}
        updated = [save.profile.id for i, save in enumerate(saves) if updates[i] and i not in failed]
        ours = {doc["_id"] async for doc in self.profiles.find({"_id": {"$in": updated}, "written_by": token}, {"_id": 1})} if updated else set()
        return [i not in failed and (not updates[i] or save.profile.id in ours) for i, save in enumerate(saves)]
