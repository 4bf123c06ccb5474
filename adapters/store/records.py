"""The writes that record what a send did at one target (``profile.esp.<target>``): pipeline updates the
outbox puts in its bulk writes, each guarded by the send lease's token. Several of one profile in one
bulk write (a change's targets) become one update of the document, each target's stages guarded by
its own token inside the pipeline: one document write instead of one per target."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, NamedTuple

from pymongo import UpdateOne

from schemas.sync import ADDRESS_LISTS, Settlement


def waiting(prefix: str) -> list[dict[str, Any]]:
    """Expressions true while a target's address list (erase, verify, unsubscribe, retire) holds work."""
    return [{"$gt": [{"$size": {"$ifNull": [f"${prefix}.{name}", []]}}, 0]} for name in ADDRESS_LISTS]


def pending(prefix: str) -> dict[str, Any]:
    """Pending: the ESP does not hold exactly the profile's member yet, or addresses wait for their work."""
    member_hash = f"${prefix}.member_hash"
    differs = {"$and": [{"$ne": [{"$ifNull": [member_hash, None]}, None]},
                        {"$ne": [member_hash, {"$ifNull": [f"${prefix}.sent_hash", None]}]}]}
    return {"$or": [differs, *waiting(prefix)]}


def settle_pending(prefix: str) -> list[dict[str, Any]]:
    """Pipeline stages that recompute ``pending``; an ``urgent`` mark lasts only while something is pending."""
    return [{"$set": {f"{prefix}.pending": pending(prefix)}},
            {"$set": {f"{prefix}.urgent": {"$and": [{"$ifNull": [f"${prefix}.urgent", False]}, f"${prefix}.pending"]}}}]


def literal(value: Any) -> dict[str, Any]:
    """Values inside pipeline updates must not be read as expressions (a trait may start with ``$``)."""
    return {"$literal": value}


def owned(profile_id: str, esp: str, token: str) -> dict[str, Any]:
    """The filter of a write that only the holder of the send lease may make."""
    return {"_id": profile_id, f"esp.{esp}.sending_token": token}


def finished(prefix: str, jobs: list[str]) -> list[dict[str, Any]]:
    """The pipeline stage taking bulk jobs confirmed finished off a target's list."""
    return [{"$set": {f"{prefix}.jobs": {"$setDifference": [{"$ifNull": [f"${prefix}.jobs", []]}, literal(jobs)]}}}] if jobs else []


def sent(prefix: str, sent_hash: str, jobs: list[str]) -> list[dict[str, Any]]:
    """The pipeline recording a member the ESP now holds (still pending if the profile moved on); sent, its
    next change is claimable at once."""
    return [{"$set": {f"{prefix}.sent_hash": sent_hash, f"{prefix}.sent_at": datetime.now(timezone.utc), f"{prefix}.sending_until": None}},
            {"$unset": f"{prefix}.swept_at"}, *finished(prefix, jobs), *settle_pending(prefix)]


def failed(prefix: str, failed_hash: str, code: str, jobs: list[str]) -> list[dict[str, Any]]:
    """The pipeline recording a member the ESP refused."""
    return [{"$set": {f"{prefix}.failed_hash": failed_hash, f"{prefix}.failed_code": code, f"{prefix}.sending_until": None}},
            *finished(prefix, jobs)]


def released(prefix: str, jobs: list[str]) -> list[dict[str, Any]]:
    """The pipeline ending a send lease with nothing sent, ``pending`` settled from what is stored."""
    return [{"$set": {f"{prefix}.sending_until": None}}, *finished(prefix, jobs), *settle_pending(prefix)]


class Write(NamedTuple):
    """A pipeline update of one profile's record at one target, only where ``token`` holds its send lease."""

    profile_id: str
    esp: str
    token: str
    pipeline: list[dict[str, Any]]


def noted(prefix: str, job_id: str) -> list[dict[str, Any]]:
    """The pipeline adding a bulk job the ESP accepted to a target's list (a repeat adds nothing)."""
    return [{"$set": {f"{prefix}.jobs": {"$setUnion": [{"$ifNull": [f"${prefix}.jobs", []]}, literal([job_id])]}}}]


def part_writes(esp: str, token: str, sent_: list[tuple[str, str]], failed_: list[tuple[str, str, str]], released_: list[str],
                jobs: list[str]) -> list[Write]:
    """The writes of one part of a :class:`Settlement`."""
    prefix = f"esp.{esp}"
    return [*(Write(pid, esp, token, sent(prefix, h, jobs)) for pid, h in sent_),
            *(Write(pid, esp, token, failed(prefix, h, code, jobs)) for pid, h, code in failed_),
            *(Write(pid, esp, token, released(prefix, jobs)) for pid in released_)]


def settlement_writes(settlement: Settlement) -> list[Write]:
    """The writes of a :class:`Settlement`: its noted jobs first, so a job's record after them takes it off again."""
    noted_ = [Write(pid, esp, settlement.token, noted(f"esp.{esp}", job_id)) for esp, job_id, pids in settlement.noted for pid in pids]
    return [*noted_, *(w for esp, *part in settlement.parts for w in part_writes(esp, settlement.token, *part))]


def guarded(prefix: str, token: str, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``pipeline``'s stages applied only where ``token`` holds the target's lease (else each field keeps
    its value): the lease's guard moved from the write's filter into the update."""
    owns = {"$eq": [f"${prefix}.sending_token", literal(token)]}
    stages = []
    for stage in pipeline:
        (operator, spec), = stage.items()
        if operator == "$set":
            stages.append({"$set": {name: {"$cond": [owns, value, f"${name}"]} for name, value in spec.items()}})
        elif operator == "$unset":
            stages.append({"$set": {name: {"$cond": [owns, "$$REMOVE", f"${name}"]} for name in ([spec] if isinstance(spec, str) else spec)}})
        else:
            raise ValueError(f"no guarded form of {operator}")
    return stages


def one_per_profile(writes: list[Write]) -> list[UpdateOne]:
    """One update per profile for an unordered bulk write: a lone write keeps its guard in the filter;
    several, at one profile's targets (or several of one target, in their order), share one document write."""
    by_profile: dict[str, list[Write]] = {}
    for write in writes:
        by_profile.setdefault(write.profile_id, []).append(write)
    ops = []
    for pid, mine in by_profile.items():
        if len(mine) == 1:
            (write,) = mine
            ops.append(UpdateOne(owned(pid, write.esp, write.token), write.pipeline))
        else:
            # Never a profile merged into another (its pointer has no sync state to guard, nor to create).
            ops.append(UpdateOne({"_id": pid, "merged_into": {"$exists": False}},
                                 [stage for w in mine for stage in guarded(f"esp.{w.esp}", w.token, w.pipeline)]))
    return ops
