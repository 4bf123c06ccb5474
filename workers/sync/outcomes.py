"""What a sync round (``rounds.py``) keeps while it runs: the outcomes it records per (target, profile)
pair and answers each pair's messages with, its hold on its lanes, and a lane record waiting to ride
another write. Pure bookkeeping: no I/O."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adapters.redis.trail import Trail
from schemas.errors import CircuitOpen, EspRejected, MergetagError, SyncBusy
from schemas.sync import Settlement, SyncState
from workers.sync import policy

Pair = tuple[str, str]
"""A target and a profile."""


@dataclass(eq=False)
class Carried:
    """A lane round's record waiting for a write to ride; ``written`` once one carried it."""

    settlement: Settlement
    written: asyncio.Future[None]


class Hold:
    """A round's hold on its lanes: ``freeing`` once its job is accepted, and the lanes free a gap later."""

    __slots__ = ("freeing",)

    def __init__(self) -> None:
        self.freeing = False


@dataclass
class Outcomes:
    """What one round records, per pair, and what each pair's message is answered with."""

    settlement: Settlement
    answer: Callable[[dict[Pair, BaseException | None]], None]
    """Answers the messages of pairs recorded before the round's end."""
    parked: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[Pair, BaseException] = field(default_factory=dict)
    sent: dict[str, list[tuple[str, SyncState]]] = field(default_factory=dict)
    holding: set[Pair] = field(default_factory=set)
    """Pairs whose request may still land: their leases run out by themselves, nothing releases them."""
    alone: dict[str, list[str]] = field(default_factory=dict)
    """Profiles of a job the ESP refused whole: each is sent on its own once the round is recorded."""
    lane: Hold | None = None
    """The round's hold on its lanes, freed a gap after its job is accepted."""
    others: tuple[dict[str, list[str]], asyncio.Future[Any]] | None = None
    """In a round with a lane, the other targets' profiles and their sends: recorded with the job's note."""

    def take_others(self) -> tuple[Settlement, dict[Pair, BaseException | None]] | None:
        """The other targets' outcomes, once their sends are done (and only once): their part of the
        settlement, taken out of the round's, and what each of their pairs is answered with. Parked
        pairs stay for the round's end, where they are parked."""
        if self.others is None or not self.others[1].done() or self.others[1].cancelled() or self.others[1].exception():
            return None
        targets, self.others = self.others[0], None
        early = Settlement(self.settlement.token, [part for part in self.settlement.parts if part[0] in targets])
        self.settlement.parts = [part for part in self.settlement.parts if part[0] not in targets]
        answers = {(esp, pid): self.errors.get((esp, pid)) for esp, pids in targets.items() for pid in pids
                   if pid not in self.parked.get(esp, ())}
        return early, answers

    def lacking(self, esp: str, states: dict[str, SyncState]) -> dict[str, SyncState]:
        """The members ``esp`` lacks, to send; the pairs whose member it holds already are released."""
        todo = {pid: state for pid, state in states.items() if policy.needs_send(state, False)}
        if released := [pid for pid in states if pid not in todo]:
            self.settlement.add(esp, released=released)
        return todo

    def add_sent(self, esp: str, pid: str, state: SyncState, jobs: list[str]) -> None:
        assert state.member_hash is not None  # needs_send: there is a member to send
        self.settlement.add(esp, sent=[(pid, state.member_hash)], jobs=jobs)
        self.sent.setdefault(esp, []).append((pid, state))

    def add_refused(self, esp: str, pid: str, state: SyncState, exc: EspRejected, jobs: list[str], trail: Trail | None, request: str) -> None:
        """A member the ESP refused: recorded as failed, and its own message fails."""
        assert state.member_hash is not None
        self.settlement.add(esp, failed=[(pid, state.member_hash, exc.code)], jobs=jobs)
        self.errors[esp, pid] = exc
        if trail is not None:
            trail.add([f"profile:{pid}"], "refused", profile=pid, target=esp, request=request, status=exc.code)

    def add_unsent(self, esp: str, pids: list[str], exc: Exception) -> None:
        """A request that failed without a refusal: released unless it may still land (then its leases run
        out by themselves, so nothing overtakes it); parked while blocked, else its messages fail."""
        pairs = [(esp, pid) for pid in pids]
        if isinstance(exc, MergetagError) and not exc.may_still_land:
            self.settlement.add(esp, released=pids)
        else:  # may still land, or unknown
            self.holding.update(pairs)
        if isinstance(exc, (CircuitOpen, SyncBusy)):
            self.parked.setdefault(esp, []).extend(pids)
        else:
            self.errors.update(dict.fromkeys(pairs, exc))


def touches(settlement: Settlement, pairs: set[Pair]) -> bool:
    """Whether ``settlement`` records an outcome of any of ``pairs``."""
    return any((esp, pid) in pairs for esp, sent, failed, released, _ in settlement.parts
               for pid in [*(p for p, _ in sent), *(p for p, _, _ in failed), *released])


def documents(settlement: Settlement) -> int:
    """How many profile documents writing ``settlement`` updates (its parts and noted jobs, one update a profile)."""
    return len({pid for _, sent, failed, released, _ in settlement.parts for pid in [*(p for p, _ in sent), *(p for p, _, _ in failed), *released]}
               | {pid for _, _, pids in settlement.noted for pid in pids})


def answer_all(batch: dict[Pair, list[asyncio.Future[None]]], outcomes: dict[Pair, BaseException | None]) -> None:
    """Answer the messages of ``outcomes``' pairs (each once: a pair answered before the round's end keeps its answer)."""
    for pair, exc in outcomes.items():
        for done in batch.get(pair, ()):
            if done.done():
                continue
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(None)
