"""A broker's nodes: ``MERGETAG_AMQP_URL`` names one RabbitMQ node or several, comma-separated (a
cluster's); every client tries them in turn and fails over to the next when one is gone.

A cluster replicates the quorum queues, so any node that is up serves every queue; the order only
says where to try first.
"""

from __future__ import annotations

import pika

CONNECT_TIMEOUT_S = 3.0
"""How long one node may take to accept a connection before the next one is tried (a stopped node
refuses at once; a node that vanished from the network only times out)."""


def urls(amqp_url: str) -> list[str]:
    """The node URLs of a setting: comma- or semicolon-separated (Dramatiq's own separator)."""
    found = [u.strip() for u in amqp_url.replace(";", ",").split(",") if u.strip()]
    if not found:
        raise ValueError("no AMQP URL given")
    return found


def parameters(amqp_url: str) -> list[pika.URLParameters]:
    """pika's connection parameters of every node, each with a bounded connect timeout."""
    found = []
    for url in urls(amqp_url):
        params = pika.URLParameters(url)
        if "socket_timeout" not in url:
            params.socket_timeout = CONNECT_TIMEOUT_S
        found.append(params)
    return found


def blocking(amqp_url: str) -> pika.BlockingConnection:
    """A blocking connection to the first node that answers (pika tries them in order)."""
    return pika.BlockingConnection(parameters(amqp_url))
