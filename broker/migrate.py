"""Bring queues declared by an older version to the current declarations (``mergetag queues migrate``).

RabbitMQ cannot change a queue's arguments in place, and refuses a redeclaration with
different ones (406 PRECONDITION_FAILED), which would stop the workers at start-up. A
queue whose declaration differs is drained into a durable temporary queue
(``<name>.migrating``), deleted, declared anew, and refilled from the temporary queue.

Every move is confirm-before-ack: a message is acked in its source only once the broker
has confirmed the copy, so a crash can duplicate a message (the pipeline is idempotent)
but never lose one. A rerun finishes a half-done migration: whatever waits in a
temporary queue is moved back. Nothing here knows which arguments changed, so the same
command carries any later change of declarations (a TTL dropped, a queue type changed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import ChannelClosedByBroker

from broker import nodes

TEMPORARY_SUFFIX = ".migrating"
# A publisher that keeps filling the queue being drained would keep the migration from finishing.
MAX_DRAIN_ROUNDS = 50

T = TypeVar("T")


class MigrationRefused(Exception):
    """The queue is in use (consumers attached, or messages keep arriving): stop the workers first."""


class _Missing(Exception):
    """No such queue (AMQP 404)."""


class _PreconditionFailed(Exception):
    """Declared differently, not empty or in use (AMQP 406)."""


def temporary_name(name: str) -> str:
    return name + TEMPORARY_SUFFIX


@dataclass
class Migration:
    """What a run did (or, dry, would do): messages moved back per migrated queue."""

    dry_run: bool = False
    migrated: dict[str, int] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "migrated": self.migrated, "messages_moved": sum(self.migrated.values()),
                "unchanged": self.unchanged, "absent": self.absent}


class _Queues:
    """Each broker operation on a channel of its own: a refused one closes only its channel."""

    def __init__(self, connection: BlockingConnection) -> None:
        self._connection = connection

    def _do(self, action: Callable[[BlockingChannel], T]) -> T:
        channel = self._connection.channel()
        try:
            return action(channel)
        except ChannelClosedByBroker as exc:
            if exc.reply_code == pika.spec.NOT_FOUND:
                raise _Missing(exc.reply_text) from None
            if exc.reply_code == pika.spec.PRECONDITION_FAILED:
                raise _PreconditionFailed(exc.reply_text) from None
            raise
        finally:
            if channel.is_open:
                channel.close()

    def inspect(self, name: str) -> tuple[int, int] | None:
        """(messages ready, consumers), or None when the queue does not exist."""
        try:
            method = self._do(lambda ch: ch.queue_declare(name, passive=True).method)
        except _Missing:
            return None
        return method.message_count, method.consumer_count

    def matches(self, name: str, arguments: dict[str, object]) -> bool:
        """Whether the existing queue ``name`` is declared exactly so (a declaration RabbitMQ accepts)."""
        try:
            self._do(lambda ch: ch.queue_declare(name, durable=True, arguments=arguments))
        except _PreconditionFailed:
            return False
        return True

    def declare(self, name: str, arguments: dict[str, object]) -> None:
        self._do(lambda ch: ch.queue_declare(name, durable=True, arguments=arguments))

    def delete_if_idle(self, name: str) -> bool:
        """Delete ``name`` unless a message or a consumer arrived meanwhile."""
        try:
            self._do(lambda ch: ch.queue_delete(name, if_unused=True, if_empty=True))
        except _PreconditionFailed:
            return False
        return True

    def move(self, source: str, target: str) -> int:
        """Move every message of ``source`` to ``target``, each acked only after its copy is confirmed."""

        def run(channel: BlockingChannel) -> int:
            channel.confirm_delivery()
            moved = 0
            while True:
                method, properties, body = channel.basic_get(source, auto_ack=False)
                if method is None:
                    return moved
                channel.basic_publish("", target, body, properties=properties, mandatory=True)
                channel.basic_ack(method.delivery_tag)
                moved += 1

        return self._do(run)


@contextmanager
def _connected(amqp_url: str) -> Iterator[_Queues]:
    # Probing closes channels on purpose (404, 406); pika would log each one as a warning.
    channel_log = logging.getLogger("pika.channel")
    level = channel_log.level
    channel_log.setLevel(logging.ERROR)
    connection = nodes.blocking(amqp_url)
    try:
        yield _Queues(connection)
    finally:
        channel_log.setLevel(level)
        if connection.is_open:
            connection.close()


def migrate(amqp_url: str, declarations: list[tuple[str, dict[str, object]]], dry_run: bool = False) -> Migration:
    """Make every queue in ``declarations`` exist as declared there, keeping its messages.

    Queues that do not exist are left alone (the workers declare them). Raises
    MigrationRefused, before touching any queue, when consumers are attached to one that differs.
    """
    done = Migration(dry_run=dry_run)
    with _connected(amqp_url) as queues:
        plan = []
        for name, arguments in declarations:
            found, parked = queues.inspect(name), queues.inspect(temporary_name(name))
            differs = found is not None and not queues.matches(name, arguments)
            if found is None and parked is None:
                done.absent.append(name)
            elif not differs and parked is None:
                done.unchanged.append(name)
            else:
                plan.append((name, arguments, differs))
                done.migrated[name] = (found or (0, 0))[0] + (parked or (0, 0))[0]
        busy = [name for name, _, differs in plan if differs and (queues.inspect(name) or (0, 0))[1]]
        if busy and not dry_run:
            raise MigrationRefused(f"consumers are attached to {', '.join(busy)}: stop the workers before migrating")
        if dry_run:
            return done
        for name, arguments, differs in plan:
            temporary = temporary_name(name)
            # Classic (durable, persistent, on the node this talks to), even beside quorum queues: those refuse
            # the conditional deletes (if-empty, if-unused) that keep a migration from deleting a queue a message reached.
            queues.declare(temporary, {})
            if differs:
                _drain(queues, name, temporary)
            queues.declare(name, arguments)
            done.migrated[name] = queues.move(temporary, name)
            # Nothing publishes to a temporary queue: once moved back, it is empty.
            queues.delete_if_idle(temporary)
    return done


def _drain(queues: _Queues, name: str, temporary: str) -> None:
    """Move everything out of ``name`` into ``temporary`` and delete ``name``."""
    for _ in range(MAX_DRAIN_ROUNDS):
        found = queues.inspect(name)
        if found is None:
            return
        _, consumers = found
        if consumers:
            raise MigrationRefused(f"{name} has {consumers} consumer(s): stop the workers before migrating")
        queues.move(name, temporary)
        if queues.delete_if_idle(name):
            return
    raise MigrationRefused(f"messages keep arriving in {name}: stop what publishes to it before migrating")
