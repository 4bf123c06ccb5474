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


def all_queues(prefix: str) -> list[str]:
    return [events_queue(prefix), sync_queue(prefix)]


MAX_PRIORITY = 10
URGENT = 9  # consent changes and erasures: ahead of bulk traffic


def queue_arguments(queue: str) -> dict[str, object]:
    """Arguments of a canonical (and its delay) queue: rejects go to its dead-letter queue; messages have priorities."""
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": xq_name(queue), "x-max-priority": MAX_PRIORITY}


def dead_letter_arguments() -> dict[str, object]:
    """Arguments of a dead-letter queue: none that expire or drop a message (no TTL, no length limit).

    Dead letters stay until an operator replays or purges them (``mergetag dlq``).
    """
    return {}


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
    "MAX_PRIORITY",
    "URGENT",
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
    "xq_name",
]
