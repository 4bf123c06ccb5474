"""Erasure as its own step: forget a person, seen before or not (the plan itself is pure: ``erasure.py``)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

from broker import topology
from broker.dead_letters import DeadLetter
from schemas.errors import LostRace
from schemas.events import CustomerErased
from workers.profiles import erasure
from workers.profiles.resolve import MAX_WRITE_ATTEMPTS
from workers.runtime import Runtime

log = logging.getLogger(__name__)


async def erase_person(rt: Runtime, event: CustomerErased) -> erasure.ErasurePlan | None:
    """Forget the person ``event`` names: one tombstone found by every identifier of the request and of
    every profile that held them, nothing personal left in any of their documents, and a receipt that
    shows how far each ESP target got. Returns the plan carried out (its addresses wait for the urgent
    sync that deletes them at the ESPs); None for a replay of a finished request, which does nothing.
    """
    keys = erasure.request_keys(event)
    targets = tuple(rt.esps)
    for _ in range(MAX_WRITE_ATTEMPTS):
        owners = await rt.store.find_owners(keys)
        plan = erasure.plan(owners, event, rt.hasher, targets)
        tomb = next((p for p, _ in owners if p.erased is not None), None)
        replay = len(owners) == 1 and tomb is not None and tomb.identifiers == plan.tombstone.identifiers
        if replay and ((await rt.receipts.get(plan.request_id)) or {}).get("targets"):
            log.info("erasure %s already recorded for %s", plan.request_id, tomb.id)
            return None
        now = datetime.now(timezone.utc)
        receipt = {
            "$setOnInsert": {"requested_at": event.received_at, "requested_by": event.source},
            "$set": {f"targets.{esp}": {"status": "pending" if plan.addresses else "verified", "at": now,
                                        "addresses": len(plan.addresses)} for esp in targets},
            "$addToSet": {"keys": {"$each": erasure.hashed_request(event, rt.hasher)}, "profile_ids": plan.tombstone.id},
        }
        if await rt.store.erase(plan, targets, receipt):
            break
    else:
        raise LostRace(f"erasure lost {MAX_WRITE_ATTEMPTS} races")
    log.info("erasure %s: profile %s erased, %d absorbed, %d address(es) to delete", plan.request_id, plan.tombstone.id,
             len(plan.pointers) + len(plan.absorbed), len(plan.addresses))
    return plan


async def remove_payloads(rt: Runtime, plan: erasure.ErasurePlan) -> None:
    """Raw payloads of the person kept elsewhere go too: dead letters and quarantined deliveries that
    name them or their profiles. (Anything left over is inert anyway: replayed or redriven, it meets
    the tombstone and is dropped.)"""
    hashed = set(plan.keys)
    profiles = {plan.tombstone.id, *(pid for pid, _ in plan.pointers), *plan.absorbed}

    def of_person(letter: DeadLetter) -> bool:
        args = letter.message.args
        named = letter.sync_target().get("profile_id") or (args[0] if letter.actor == topology.CHECK_ABANDONMENT_ACTOR and args else None)
        if named in profiles:
            return True
        if letter.actor == topology.PROCESS_EVENT_ACTOR and args and isinstance(args[0], dict):
            return any(rt.hasher.index_key(k) in hashed for k in erasure.delivery_keys(args[0], rt.mappings))
        return False

    removed = await asyncio.to_thread(rt.dead_letters.purge_matching, of_person)
    quarantined = await rt.quarantine.forget(plan.keys)
    if removed or quarantined:
        await rt.receipts.removed(plan.request_id, dead_letters=len(removed), quarantined=quarantined)
        log.info("erasure %s removed %d dead letter(s) and %d quarantined delivery(ies)", plan.request_id, len(removed), quarantined)
