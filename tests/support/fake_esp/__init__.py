"""A fourth ESP for tests only, added the way the ESP README says: this folder plus one registry line
(``registry.register(DESCRIPTOR)``, in the tests that use it). It keeps its contacts in memory, in
its class, so a test sees what the sync sent; ``refuse`` names addresses it rejects."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic_settings import SettingsConfigDict

from adapters.esps.base import Esp, EspDescriptor, Held, OnJob
from adapters.esps.fields import mapped, normalize
from adapters.esps.guard import EspGuard
from adapters.esps.targets import EspTarget, TargetEnv
from schemas.errors import EspRejected
from schemas.events import Scalar
from schemas.profile import Profile

KIND = "fake"
DEFAULT_FIELDS = {"first_name": "first_name", "lifetime_value": "ltv"}


class FakeEnv(TargetEnv):
    model_config = SettingsConfigDict(env_prefix="MERGETAG_FAKE_", extra="ignore")


class FakeEsp:
    kind = KIND
    batch_limit = 50
    prefers_bulk = False
    contacts: ClassVar[dict[str, dict[str, Any]]] = {}
    requests: ClassVar[list[str]] = []
    refuse: ClassVar[set[str]] = set()
    running: ClassVar[set[str]] = set()
    """Bulk jobs still running at the fake ESP."""

    def __init__(self, name: str, fields: dict[str, Any]) -> None:
        self.name = name
        self._fields = normalize(fields)

    def member(self, profile: Profile) -> dict[str, Any] | None:
        if profile.email is None:
            return None
        consent = profile.consent.get("email")
        return {"email": profile.email, "fields": mapped(profile, self._fields), "unsubscribed": bool(consent and consent.state == "unsubscribed")}

    def key(self, member: dict[str, Any]) -> str:
        return member["email"].lower()

    def fields(self, member: dict[str, Any]) -> dict[str, Scalar]:
        return member["fields"]

    def unsubscribed(self, member: dict[str, Any]) -> bool:
        return member["unsubscribed"]

    async def upsert(self, member: dict[str, Any], on_job: OnJob | None = None) -> None:
        self.requests.append("upsert")
        if self.key(member) in self.refuse:
            raise EspRejected("invalid_member: refused by the fake ESP")
        self.contacts[self.key(member)] = member

    async def upsert_batch(self, members: list[dict[str, Any]], on_job: OnJob | None = None) -> dict[str, str]:
        self.requests.append("batch")
        refused = {self.key(m): "refused by the fake ESP" for m in members if self.key(m) in self.refuse}
        self.contacts.update({self.key(m): m for m in members if self.key(m) not in refused})
        return refused

    async def job_done(self, job_id: str) -> bool:
        return job_id not in self.running

    async def erase(self, email: str) -> None:
        self.contacts.pop(email.lower(), None)

    async def unsubscribe(self, email: str) -> None:
        if email.lower() in self.contacts:
            self.contacts[email.lower()] = {**self.contacts[email.lower()], "unsubscribed": True}

    async def retire(self, email: str) -> None:
        await self.unsubscribe(email)

    async def held(self, email: str) -> Held | None:
        contact = self.contacts.get(email.lower())
        return Held(contact["fields"], contact["unsubscribed"]) if contact else None

    async def field_problems(self) -> list[str]:
        return []

    async def close(self) -> None:
        pass


def client(target: EspTarget, name: str = KIND, guard: EspGuard | None = None, offline: bool = False) -> Esp:
    return FakeEsp(name, target.fields or DEFAULT_FIELDS)


DESCRIPTOR = EspDescriptor(kind=KIND, client=client, env=FakeEnv, default_fields=DEFAULT_FIELDS, batch_limit=FakeEsp.batch_limit)
