"""An in-memory outbox with the real one's contract (``adapters/store/outbox.py``): leases fenced by
their token, pending recomputed on every settle. For in-process tests of the sync's actors; the real
outbox is tested against MongoDB (SecantusDB or ``MONGODB_URI``)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from adapters.esps.base import member_hash
from schemas.errors import SyncBusy
from schemas.sync import ADDRESS_LISTS, Claimed, Expected, Settlement, SyncState


class FakeOutbox:
    def __init__(self) -> None:
        self.states: dict[tuple[str, str], dict[str, Any]] = {}
        self.parked: list[str] = []

    def put(self, profile_id: str, esp: str, member: dict[str, Any] | None, **lists: list[str]) -> None:
        """What the profile store writes with a profile: the member it should hold (and address work)."""
        state = self.states.setdefault((profile_id, esp), {})
        state.update(member=member, member_hash=member_hash(member) if member else None, **lists)
        self._settle(state)

    def state(self, profile_id: str, esp: str) -> SyncState:
        return SyncState.model_validate(self.states.get((profile_id, esp), {}))

    @staticmethod
    def _settle(state: dict[str, Any]) -> None:
        differs = state.get("member_hash") is not None and state.get("member_hash") != state.get("sent_hash")
        state["pending"] = differs or any(state.get(name) for name in ADDRESS_LISTS)

    def _owned(self, profile_id: str, esp: str, token: str) -> dict[str, Any] | None:
        state = self.states.get((profile_id, esp))
        return state if state is not None and state.get("sending_token") == token else None

    async def claim_send(self, profile_id: str, esp: str, lease: timedelta) -> tuple[SyncState, str] | None:
        state = self.states.get((profile_id, esp))
        if state is None:
            return None
        now = datetime.now(timezone.utc)
        if state.get("sending_until") and state["sending_until"] > now:
            raise SyncBusy("another send of this profile is in flight", retry_after=0.1)
        state.update(sending_until=now + lease, sending_token=uuid.uuid4().hex)
        return SyncState.model_validate(state), state["sending_token"]

    async def claim_sends(self, profile_ids: list[str], esp: str, lease: timedelta) -> tuple[dict[str, SyncState], str]:
        token, now, claimed = uuid.uuid4().hex, datetime.now(timezone.utc), {}
        for pid in profile_ids:
            state = self.states.get((pid, esp))
            if state is not None and not (state.get("sending_until") and state["sending_until"] > now):
                state.update(sending_until=now + lease, sending_token=token)
                claimed[pid] = SyncState.model_validate(state)
        return claimed, token

    async def claim_expected(self, expected: dict[str, dict[str, Expected]], leases: dict[str, timedelta],
                             riders: Sequence[Settlement] = (), token: str | None = None) -> tuple[Claimed, list[str]]:
        await FakeOutbox.settle(self, *riders)  # in the same write
        claimed, now, left = Claimed(token or uuid.uuid4().hex), datetime.now(timezone.utc), []
        for pid, targets in expected.items():
            states = {esp: self.states.get((pid, esp)) for esp in targets}
            if not all(state is not None and state.get("member_hash") == hint.member_hash and state.get("sent_hash") != hint.member_hash
                       and state.get("failed_hash") != hint.member_hash and not (state.get("sending_until") and state["sending_until"] > now)
                       and not any(state.get(name) for name in ADDRESS_LISTS) for (esp, hint), state in zip(targets.items(), states.values())):
                left.append(pid)
                continue
            for esp, hint in targets.items():
                self.states[pid, esp].update(sending_until=now + leases[esp], sending_token=claimed.token)
                claimed.states[esp, pid] = hint.state(claimed.token, now + leases[esp])
        return claimed, left

    async def claim_round(self, pairs: dict[str, list[str]], leases: dict[str, timedelta], token: str | None = None) -> Claimed:
        claimed, now = Claimed(token or uuid.uuid4().hex), datetime.now(timezone.utc)
        for esp, pids in pairs.items():
            for pid in pids:
                state = self.states.get((pid, esp))
                if state is None:
                    continue
                if state.get("sending_until") and state["sending_until"] > now:
                    claimed.busy.append((esp, pid))
                else:
                    state.update(sending_until=now + leases[esp], sending_token=claimed.token)
                    claimed.states[esp, pid] = SyncState.model_validate(state)
        return claimed

    async def settle(self, *settlements: Settlement, wait_s: float = 0.0) -> None:
        for settlement in settlements:
            for esp, job_id, pids in settlement.noted:
                for pid in pids:
                    if (state := self._owned(pid, esp, settlement.token)) is not None:
                        state.setdefault("jobs", []).append(job_id)
            for esp, sent, failed, released, jobs in settlement.parts:
                await self.settle_many(esp, settlement.token, sent, failed, released, jobs)

    async def note_job(self, esp: str, token: str, job_id: str, profile_ids: list[str], settled: Sequence[Settlement] = ()) -> None:
        for pid in profile_ids:
            if (state := self._owned(pid, esp, token)) is not None:
                state.setdefault("jobs", []).append(job_id)
        await FakeOutbox.settle(self, *settled)  # in the same write

    async def job_finished(self, profile_id: str, esp: str, token: str, job_id: str) -> None:
        if (state := self._owned(profile_id, esp, token)) is not None:
            state["jobs"] = [j for j in state.get("jobs", []) if j != job_id]

    async def settle_many(self, esp: str, token: str, sent: list[tuple[str, str]], failed: list[tuple[str, str, str]],
                          released: list[str], jobs: list[str] | None = None) -> None:
        for pid, digest in sent:
            await self.mark_sent(pid, esp, token, digest, jobs)
        for pid, digest, code in failed:
            await self.mark_failed(pid, esp, token, digest, code)
        for pid in released:
            await self.release_send(pid, esp, token)

    async def park(self, profile_ids: list[str], esp: str) -> None:
        self.parked += profile_ids

    async def release_lost(self, profile_ids: list[str], esp: str, token: str, lease: timedelta) -> bool:
        for pid in profile_ids:
            await self.release_send(pid, esp, token)
        return True

    async def release_send(self, profile_id: str, esp: str, token: str) -> None:
        if (state := self._owned(profile_id, esp, token)) is not None:
            state["sending_until"] = None
            self._settle(state)

    async def mark_sent(self, profile_id: str, esp: str, token: str, sent_hash: str, jobs: list[str] | None = None) -> bool:
        state = self._owned(profile_id, esp, token)
        if state is None:
            return False
        state.update(sent_hash=sent_hash, sending_until=None)
        state["jobs"] = [j for j in state.get("jobs", []) if j not in (jobs or [])]
        self._settle(state)
        return True

    async def mark_failed(self, profile_id: str, esp: str, token: str, failed_hash: str, code: str) -> None:
        if (state := self._owned(profile_id, esp, token)) is not None:
            state.update(failed_hash=failed_hash, failed_code=code, sending_until=None)

    async def done(self, profile_id: str, esp: str, token: str, name: str, emails: list[str]) -> None:
        if (state := self._owned(profile_id, esp, token)) is not None:
            state[name] = [e for e in state.get(name, []) if e not in emails]

    async def forget(self, profile_id: str, esp: str, token: str, emails: list[str]) -> None:
        if (state := self._owned(profile_id, esp, token)) is not None:
            state["erase"] = [e for e in state.get("erase", []) if e not in emails]
            state["verify"] = sorted({*state.get("verify", []), *emails})

    async def redo(self, profile_id: str, esp: str, token: str, emails: list[str]) -> None:
        if (state := self._owned(profile_id, esp, token)) is not None:
            state["verify"] = [e for e in state.get("verify", []) if e not in emails]
            state["erase"] = sorted({*state.get("erase", []), *emails})
            state.pop("verify_checks", None)

    async def checked(self, profile_id: str, esp: str, token: str) -> int:
        state = self._owned(profile_id, esp, token)
        if state is None:
            return 0
        state["verify_checks"] = state.get("verify_checks", 0) + 1
        return state["verify_checks"]

    def _sendable(self, esp: str) -> list[str]:
        return [pid for (pid, target), s in self.states.items() if target == esp and s.get("pending")
                and (s.get("failed_hash") != s.get("member_hash") or any(s.get(n) for n in ADDRESS_LISTS))]

    async def pending_ids(self, esp: str, limit: int) -> list[str]:
        return self._sendable(esp)[:limit]

    async def count_pending(self, esp: str, cap: int) -> int:
        return min(cap, len(self._sendable(esp)))


@dataclass
class FakeStore:
    outbox: FakeOutbox = field(default_factory=FakeOutbox)

    async def close(self) -> None:
        pass


@dataclass
class FakeCoalescer:
    """Coalescing off (every change schedules its own sync), as without Redis."""

    window_ms: int = 0
    started_syncs: list[tuple[str, str]] = field(default_factory=list)

    async def first_in_window(self, targets: list[str], profile_id: str) -> list[str]:
        return list(targets)

    async def started(self, targets: list[str], profile_id: str) -> None:
        self.started_syncs += [(esp, profile_id) for esp in targets]

    async def close(self) -> None:
        pass


@dataclass
class FakeReceipts:
    marks: list[tuple[str, str, str]] = field(default_factory=list)

    async def mark(self, profile_id: str, esp: str, status: str, code: str | None = None) -> None:
        self.marks.append((profile_id, esp, status))
