"""Queue names and declarations, shared by the receiver's publisher and Dramatiq.

The receiver declares the same durable queues, with the same arguments, that
Dramatiq's RabbitMQ broker declares, so that it can publish before any worker
has started and the two never disagree (RabbitMQ refuses a redeclaration with
different arguments).
"""

from __future__ import annotations

from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL
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


def declarations(queue: str) -> list[tuple[str, dict[str, object]]]:
    """Every queue Dramatiq declares for ``queue``: itself, its delay queue, its dead-letter queue."""
    return [
        (queue, queue_arguments(queue)),
        (dq_name(queue), queue_arguments(queue)),
        (xq_name(queue), {"x-message-ttl": DEAD_MESSAGE_TTL}),
    ]


__all__ = [
    "PROCESS_EVENT_ACTOR",
    "SYNC_PROFILE_ACTOR",
    "CHECK_ABANDONMENT_ACTOR",
    "MAX_PRIORITY",
    "URGENT",
    "SYNC_BATCH_ACTOR",
    "SYNC_URGENT_ACTOR",
    "all_queues",
    "declarations",
    "dq_name",
    "events_queue",
    "q_name",
    "queue_arguments",
    "sync_queue",
    "xq_name",
]
