"""Counting the commands a MongoDB client sends, by name: how tests and benchmarks see round trips."""

from __future__ import annotations

from collections import Counter

from pymongo import monitoring


class CommandCounts(monitoring.CommandListener):
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.counts[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass
