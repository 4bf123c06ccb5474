"""Per-source delivery counters, exposed in the Prometheus text format at ``/metrics``."""

from __future__ import annotations

from collections import Counter


class DeliveryCounters:
    """accepted, duplicate, ignored (accepted, but no canonical meaning) and rejected by reason."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def add(self, source: str, outcome: str, reason: str = "", n: int = 1) -> None:
        if n:
            self.counts[(source, outcome, reason)] += n

    def get(self, source: str, outcome: str, reason: str = "") -> int:
        return self.counts[(source, outcome, reason)]

    def prometheus(self) -> str:
        lines = [
            "# HELP mergetag_deliveries_total Deliveries by source, outcome and rejection reason.",
            "# TYPE mergetag_deliveries_total counter",
        ]
        for (source, outcome, reason), n in sorted(self.counts.items()):
            lines.append(f'mergetag_deliveries_total{{source="{source}",outcome="{outcome}",reason="{reason}"}} {n}')
        return "\n".join(lines) + "\n"
