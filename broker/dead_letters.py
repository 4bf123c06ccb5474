"""Dead-letter tools: list, show, replay and purge what landed in the ``.XQ`` queues.

Reading a queue without consuming it: every message is fetched unacknowledged
and the channel is closed at the end, which puts back whatever was not acked.
Replay publishes a fresh copy to the original queue, waits for the broker's
confirm, and only then acks the dead letter: a crash in between leaves a
duplicate, never a loss, and the pipeline's idempotency absorbs the duplicate.
A second replay finds nothing left to replay. Dead letters never expire (their queues are
declared without a TTL): they stay until an operator replays or purges them.

Every operation takes a :class:`Selection` (ids, queue, actor, reason, age, profile, ESP
target), a pure predicate over one dead letter.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import dramatiq
import pika
from pika.adapters.blocking_connection import BlockingChannel

from broker import nodes, topology

_SPENT_OPTIONS = {"dead_letter", "retries", "traceback", "eta", "last_error", "requeue_timestamp"}


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    message_id: str
    actor: str
    code: str
    detail: str
    retries: int
    failed_at_ms: int | None
    message: dramatiq.Message

    @property
    def age_s(self) -> float | None:
        return self.age_at(time.time())

    def age_at(self, now_s: float) -> float | None:
        """Seconds since it was dead-lettered, at ``now_s`` (None when it carries no time)."""
        return None if self.failed_at_ms is None else max(0.0, now_s - self.failed_at_ms / 1000)

    def summary(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "message_id": self.message_id,
            "actor": self.actor,
            "error": self.code,
            "detail": self.detail,
            "retries": self.retries,
            "age_s": None if self.age_s is None else round(self.age_s, 1),
            **self.sync_target(),
        }

    def sync_target(self) -> dict[str, Any]:
        """For a single profile's sync: which profile, to which ESP target (ids only, never personal data);
        the targets of a change that shared one message, comma-separated."""
        if self.actor not in (topology.SYNC_PROFILE_ACTOR, topology.SYNC_URGENT_ACTOR) or not self.message.args:
            return {}
        args = self.message.args
        esp = args[1] if len(args) > 1 else self.message.kwargs.get("esp", "mailchimp")
        return {"profile_id": args[0], "esp": ",".join(esp) if isinstance(esp, list) else esp}


class UnknownQueue(ValueError):
    """A ``--queue`` that names none of the deployment's queues."""


AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """An age such as ``90s``, ``30m``, ``2h``, ``7d`` or ``1w``, in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip().lower())
    if match is None:
        raise ValueError(f"not an age: {text!r} (a number and a unit: s, m, h, d or w, e.g. 30m, 2h, 7d)")
    return float(match[1]) * AGE_UNITS[match[2]]


def queue_matches(canonical: str, wanted: str) -> bool:
    """``wanted`` names the queue in full (``<prefix>.sync``) or by its last part (``sync``)."""
    return canonical == wanted or canonical.rsplit(".", 1)[-1] == wanted


@dataclass(frozen=True)
class Selection:
    """Which dead letters an operator means: every criterion given must hold; none given means all.

    ``profile`` and ``target`` only ever match a single profile's sync (the ids its arguments carry).
    """

    ids: frozenset[str] | None = None
    queue: str | None = None
    actor: str | None = None
    reason: str | None = None
    older_than_s: float | None = None
    newer_than_s: float | None = None
    profile: str | None = None
    target: str | None = None

    @property
    def narrowed(self) -> bool:
        """Whether anything was selected at all (replay and purge refuse to act on everything by accident)."""
        return any(getattr(self, f.name) is not None for f in fields(self))

    def matches(self, letter: DeadLetter, now_s: float) -> bool:
        if self.ids is not None and letter.message_id not in self.ids:
            return False
        if self.queue is not None and not queue_matches(letter.queue, self.queue):
            return False
        if self.actor is not None and letter.actor != self.actor:
            return False
        if self.reason is not None and letter.code != self.reason:
            return False
        if self.older_than_s is not None or self.newer_than_s is not None:
            age = letter.age_at(now_s)
            # A letter without a time has no age: no age filter selects it.
            if age is None:
                return False
            if self.older_than_s is not None and age < self.older_than_s:
                return False
            if self.newer_than_s is not None and age >= self.newer_than_s:
                return False
        sync = letter.sync_target()
        if self.profile is not None and sync.get("profile_id") != self.profile:
            return False
        return self.target is None or self.target in str(sync.get("esp", "")).split(",")


def _broker_reason(headers: dict[str, Any] | None) -> dict[str, Any]:
    """Why RabbitMQ itself dead-lettered a message (``x-death``): a message delivered more often than the
    queue's delivery limit (workers died holding it) carries no reason of ours."""
    deaths = (headers or {}).get("x-death") or []
    if not deaths:
        return {}
    first = deaths[-1]
    at = first.get("time")
    return {"code": f"broker_{first.get('reason', 'rejected')}".replace("-", "_"),
            "detail": f"dead-lettered by RabbitMQ from {first.get('queue', '?')}",
            **({"failed_at": int(at.timestamp() * 1000)} if hasattr(at, "timestamp") else {})}


def _parse(queue: str, body: bytes, headers: dict[str, Any] | None = None) -> DeadLetter:
    message = dramatiq.Message.decode(body)
    reason = message.options.get("dead_letter") or _broker_reason(headers)
    last = message.options.get("last_error") or {}
    return DeadLetter(
        queue=queue,
        message_id=message.message_id,
        actor=message.actor_name,
        code=str(reason.get("code") or last.get("code") or "unknown"),
        detail=str(reason.get("detail") or last.get("detail") or ""),
        retries=int(reason.get("retries", message.options.get("retries", 0))),
        failed_at_ms=reason.get("failed_at") or message.options.get("requeue_timestamp"),
        message=message,
    )


class DeadLetters:
    """Operator tools over the dead-letter queues of ``prefix``.

    Parameters:
      amqp_url: the broker.
      prefix: the deployment's queue prefix.
    """

    def __init__(self, amqp_url: str, prefix: str) -> None:
        self._amqp_url = amqp_url
        self.queues = topology.all_queues(prefix)

    @contextmanager
    def _channel(self) -> Iterator[BlockingChannel]:
        connection = nodes.blocking(self._amqp_url)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for queue in self.queues:
                for name, arguments in topology.declarations(queue):
                    channel.queue_declare(name, durable=True, arguments=arguments)
            yield channel
        finally:
            if connection.is_open:
                connection.close()

    def _walk(self, channel: BlockingChannel, queue: str | None) -> Iterator[tuple[str, int, bytes, dict[str, Any] | None]]:
        """Every dead letter of the selected queues, fetched unacknowledged."""
        for canonical in self._select(queue):
            xq = topology.xq_name(canonical)
            while True:
                method, properties, body = channel.basic_get(xq, auto_ack=False)
                if method is None:
                    break
                yield canonical, method.delivery_tag, body, properties.headers

    def _select(self, queue: str | None) -> list[str]:
        if queue is None:
            return self.queues
        matches = [q for q in self.queues if queue_matches(q, queue)]
        if not matches:
            raise UnknownQueue(f"unknown queue {queue!r}; known: {', '.join(self.queues)}")
        return matches

    @staticmethod
    def _selection(queue: str | None, message_ids: set[str] | None, where: Selection | None) -> Selection:
        where = where or Selection()
        return replace(where, queue=queue or where.queue,
                       ids=frozenset(message_ids) if message_ids is not None else where.ids)

    def list(self, queue: str | None = None, where: Selection | None = None) -> list[DeadLetter]:
        where, now = self._selection(queue, None, where), time.time()
        with self._channel() as channel:
            letters = [_parse(canonical, body, headers) for canonical, _, body, headers in self._walk(channel, where.queue)]
        return [letter for letter in letters if where.matches(letter, now)]

    def show(self, message_id: str) -> DeadLetter | None:
        return next((d for d in self.list() if d.message_id == message_id), None)

    def replay(self, queue: str | None = None, message_ids: set[str] | None = None,
               where: Selection | None = None) -> list[DeadLetter]:
        """Send selected (default: all) dead letters back to their queue, with retries reset."""

        def resend(channel: BlockingChannel, letter: DeadLetter) -> None:
            old = letter.message
            options = {k: v for k, v in old.options.items() if k not in _SPENT_OPTIONS}
            options["replayed"] = old.options.get("replayed", 0) + 1
            # Built anew, not with Message.copy, which would merge the spent options back in.
            # A replayed profile sync is sent on its own, even while its ESP has a backlog sent in bulk,
            # and even if the ESP refused this very member: a replay means "try again".
            kwargs = ({**old.kwargs, "alone": True, "retry_refused": True} if old.actor_name == topology.SYNC_PROFILE_ACTOR
                      else old.kwargs)
            fresh = dramatiq.Message(
                queue_name=letter.queue, actor_name=old.actor_name, args=old.args, kwargs=kwargs,
                options=options, message_id=old.message_id, message_timestamp=old.message_timestamp,
            )
            channel.basic_publish(
                exchange="",
                routing_key=letter.queue,
                body=fresh.encode(),
                properties=pika.BasicProperties(delivery_mode=2),
                mandatory=True,
            )

        return self._take(self._selection(queue, message_ids, where), resend)

    def purge(self, queue: str | None = None, message_ids: set[str] | None = None,
              where: Selection | None = None) -> list[DeadLetter]:
        """Delete selected (default: all) dead letters."""
        return self._take(self._selection(queue, message_ids, where), lambda channel, letter: None)

    def purge_matching(self, predicate: Callable[[DeadLetter], bool]) -> list[DeadLetter]:
        """Delete the dead letters ``predicate`` selects (an erasure removes what it finds of the person)."""
        return self._take(Selection(), lambda channel, letter: None, predicate)

    def _take(self, where: Selection, action: Callable[[BlockingChannel, DeadLetter], None],
              predicate: Callable[[DeadLetter], bool] | None = None) -> list[DeadLetter]:
        taken, now = [], time.time()
        with self._channel() as channel:
            for canonical, tag, body, headers in list(self._walk(channel, where.queue)):
                letter = _parse(canonical, body, headers)
                if not where.matches(letter, now) or (predicate is not None and not predicate(letter)):
                    continue
                action(channel, letter)
                channel.basic_ack(tag)
                taken.append(letter)
        return taken
