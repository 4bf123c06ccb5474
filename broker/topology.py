"""Queue names and declarations: the one source of truth for the receiver's publisher and Dramatiq.

The receiver, the operators' tools and Dramatiq's broker (``broker.setup.TopologyBroker``)
all declare the queues from :func:`declarations`, so they can never disagree (RabbitMQ
refuses a redeclaration with different arguments, and ``mergetag queues migrate``
converts queues declared by an older version).
"""

from __future__ import annotations

from dramatiq.common import dq_name, q_name, xq_name

PROCESS_EVENT_ACTOR = "process_event"
SYNC_PROFILE_ACTOR = "sync_profile"
CHECK_ABANDONMENT_ACTOR = "check_abandonment"
SYNC_BATCH_ACTOR = "sync_batch"
SYNC_URGENT_ACTOR = "sync_urgent"


def events_queue(prefix: str) -> str:
    return f"{prefix}.events"


def sync_queue(prefix: str) -> str:
    return f"{prefix}.sync"


def urgent_queue(prefix: str) -> str:
    """Consent changes and erasures, ahead of any sync backlog: quorum queues have no message
    priorities before RabbitMQ 4.0, so urgent work has a queue (and actor) of its own."""
    return f"{prefix}.urgent"


def sync_queues(prefix: str) -> list[str]:
    """What a sync process consumes."""
    return [sync_queue(prefix), urgent_queue(prefix)]


def all_queues(prefix: str) -> list[str]:
    return [events_queue(prefix), sync_queue(prefix), urgent_queue(prefix)]


DELIVERY_LIMIT = 20
"""Deliveries of one message (a worker died or lost its channel with it unsettled) before RabbitMQ
dead-letters it: a message that kills every worker that takes it cannot loop for ever. Dramatiq's
retries do not count (each retry is a new message). RabbitMQ 4.x applies 20 when none is set; 3.x none."""

DEAD_LETTER_DELIVERY_LIMIT = 1_000_000
"""A dead letter is read by returning it (``mergetag dlq list`` fetches unacknowledged, then closes its
channel), and every return may count as a delivery: RabbitMQ 4.x drops a message past its queue's limit
when no dead-letter exchange is set, and defaults to 20. ``-1`` disables the limit in 4.x but dead-letters
on the first return in 3.10 (measured), so the limit is one no operator reaches."""


def queue_arguments(queue: str) -> dict[str, object]:
    """Arguments of a canonical (and its delay) queue: a replicated quorum queue; what is rejected or
    delivered too often goes to its dead-letter queue, at least once (RabbitMQ keeps the message until the
    dead-letter queue confirmed it, which needs ``reject-publish`` overflow; no length limit is set)."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": xq_name(queue),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": DELIVERY_LIMIT,
    }


def dead_letter_arguments() -> dict[str, object]:
    """Arguments of a dead-letter queue: a quorum queue, with nothing that expires or drops a message
    (no TTL, no length limit, a delivery limit no reading reaches).

    Dead letters stay until an operator replays or purges them (``mergetag dlq``).
    """
    return {"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT}


def declarations(queue: str) -> list[tuple[str, dict[str, object]]]:
    """Every queue Dramatiq declares for ``queue``: itself, its delay queue, its dead-letter queue."""
    return [
        (queue, queue_arguments(queue)),
        (dq_name(queue), queue_arguments(queue)),
        (xq_name(queue), dead_letter_arguments()),
    ]


def arguments(name: str) -> dict[str, object]:
    """The declared arguments of any queue name: canonical, delay (``.DQ``) or dead-letter (``.XQ``)."""
    return dict(declarations(q_name(name)))[name]


def prefix_declarations(prefix: str) -> list[tuple[str, dict[str, object]]]:
    """Every queue of a deployment, with its arguments."""
    return [declaration for queue in all_queues(prefix) for declaration in declarations(queue)]


__all__ = [
    "PROCESS_EVENT_ACTOR",
    "SYNC_PROFILE_ACTOR",
    "CHECK_ABANDONMENT_ACTOR",
    "DEAD_LETTER_DELIVERY_LIMIT",
    "DELIVERY_LIMIT",
    "SYNC_BATCH_ACTOR",
    "SYNC_URGENT_ACTOR",
    "all_queues",
    "arguments",
    "dead_letter_arguments",
    "declarations",
    "dq_name",
    "events_queue",
    "prefix_declarations",
    "q_name",
    "queue_arguments",
    "sync_queue",
    "sync_queues",
    "urgent_queue",
    "xq_name",
]
