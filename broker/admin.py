"""Queue housekeeping for tests, benchmarks and operators: depths and teardown of a prefix."""

from __future__ import annotations

from broker import nodes, topology


def _channel_do(amqp_url: str, action):  # noqa: ANN001, ANN202
    connection = nodes.blocking(amqp_url)
    try:
        return action(connection.channel())
    finally:
        connection.close()


def queue_depths(amqp_url: str, prefix: str) -> dict[str, int]:
    """Messages ready in every queue of ``prefix``: main, delay and dead-letter (declaring them if needed)."""

    def count(channel) -> dict[str, int]:  # noqa: ANN001
        return {
            name: channel.queue_declare(name, durable=True, arguments=arguments).method.message_count
            for queue in topology.all_queues(prefix)
            for name, arguments in topology.declarations(queue)
        }

    return _channel_do(amqp_url, count)


def consumer_counts(amqp_url: str, prefix: str) -> dict[str, int]:
    """Consumers attached to each canonical queue of ``prefix``."""

    def count(channel) -> dict[str, int]:  # noqa: ANN001
        return {
            queue: channel.queue_declare(queue, durable=True, arguments=topology.queue_arguments(queue)).method.consumer_count
            for queue in topology.all_queues(prefix)
        }

    return _channel_do(amqp_url, count)


def drop_queues(amqp_url: str, prefix: str) -> None:
    """Delete every queue of ``prefix`` (tests and benchmarks use a prefix of their own)."""

    def drop(channel) -> None:  # noqa: ANN001
        for queue in topology.all_queues(prefix):
            for name, _ in topology.declarations(queue):
                channel.queue_delete(name)

    _channel_do(amqp_url, drop)
