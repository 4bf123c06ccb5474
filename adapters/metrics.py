"""Prometheus metrics (prometheus-client): every process builds its own :class:`Metrics` and serves
it at ``/metrics`` — the receiver and the admin on their own HTTP port, workers and syncs on a port of
their own (``MERGETAG_WORKER_METRICS_PORT``, ``MERGETAG_SYNC_METRICS_PORT``).

Each instance has a registry of its own, so nothing is registered at import time and tests can build
as many as they like. Labels carry names of sources, outcomes, reasons, ESP targets and queues only:
never an identifier, an address or a profile id (a label is a time series, and personal data stays
out of metrics as it does out of logs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FRESHNESS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
CIRCUIT = {"closed": 0.0, "half-open": 0.5, "open": 1.0}


class Metrics:
    """Every metric mergetag exposes; a process moves those of its own stage."""

    def __init__(self) -> None:
        disable_created_metrics()  # no ``_created`` twin of every counter: half the page, nothing a dashboard reads
        r = self.registry = CollectorRegistry()
        # Receiver.
        self.deliveries = Counter("mergetag_deliveries", "Deliveries by source, outcome and rejection reason.",
                                  ["source", "outcome", "reason"], registry=r)
        # Merge (events workers).
        self.events_merged = Counter("mergetag_events_merged", "Messages of the events queue merged, by result "
                                     "(changed: some ESP target needs an update; unchanged; quarantined; failed: retried or dead-lettered).",
                                     ["result"], registry=r)
        self.merge_seconds = Histogram("mergetag_merge_seconds", "One events message from start to its durable write.",
                                       buckets=SECONDS, registry=r)
        # Sync.
        self.sync_seconds = Histogram("mergetag_sync_seconds", "One send to an ESP target, claim to record, by kind (single, batch).",
                                      ["target", "kind"], buckets=SECONDS, registry=r)
        self.synced = Counter("mergetag_members_synced", "Members the ESP accepted, by target.", ["target"], registry=r)
        self.freshness = Histogram("mergetag_freshness_seconds", "From the merge that changed a member to the ESP accepting it, by target.",
                                   ["target"], buckets=FRESHNESS, registry=r)
        self.esp_requests = Counter("mergetag_esp_requests", "ESP API requests by target, method and HTTP status "
                                    "(timeout, unreachable: no status).", ["target", "kind", "status"], registry=r)
        self.esp_request_seconds = Histogram("mergetag_esp_request_seconds", "ESP API request latency by target and method.",
                                             ["target", "kind"], buckets=SECONDS, registry=r)
        self.esp_throttled = Counter("mergetag_esp_throttled", "429 answers by target.", ["target"], registry=r)
        self.sweeper_backlog = Gauge("mergetag_sweeper_backlog", "Profiles pending for a target as the sweeper last counted them.",
                                     ["target"], registry=r)
        # Send-time feed.
        self.feed_requests = Counter("mergetag_feed_requests", "Feed requests by target and result (hit, miss: read from "
                                     "the store, not_found, not_modified, unauthorized, limited).", ["target", "result"], registry=r)
        self.feed_seconds = Histogram("mergetag_feed_seconds", "Feed request to answer, by cache result (hit, miss).",
                                      ["result"], buckets=(0.0005, 0.001, 0.0025, *SECONDS), registry=r)
        # What the admin process reads from the broker, the store and the guards when scraped.
        self.queue_depth = Gauge("mergetag_queue_depth", "Messages ready per queue (events, sync, urgent, delay, dead letter).",
                                 ["queue"], registry=r)
        self.dead_letters = Gauge("mergetag_dead_letters", "Dead letters by queue and reason (reasons counted up to a scan limit).",
                                  ["queue", "reason"], registry=r)
        self.quarantined = Gauge("mergetag_quarantined", "Quarantined deliveries by reason.", ["reason"], registry=r)
        self.circuit = Gauge("mergetag_esp_circuit", "Circuit per target: 0 closed, 0.5 half-open, 1 open.", ["target"], registry=r)
        self.rate_scale = Gauge("mergetag_esp_rate_scale", "Share of the configured rate a target is sent at (1: all).", ["target"], registry=r)
        self.paused_seconds = Gauge("mergetag_esp_paused_seconds", "How long a target is still paused (429, Retry-After).",
                                    ["target"], registry=r)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> Any:  # noqa: S104 - scraped from outside the container
        """Serve ``/metrics`` on ``port`` from a thread of its own (workers and syncs have no HTTP server).
        A port already taken is logged, not fatal: a worker keeps working unscraped."""
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.error("metrics not served on port %s: %s", port, exc.strerror)
            return None
        log.info("metrics on %s:%s", host, port)
        return server

    def esp_request(self, target: str, kind: str, status: int | str, seconds: float) -> None:
        self.esp_requests.labels(target, kind, str(status)).inc()
        self.esp_request_seconds.labels(target, kind).observe(seconds)
        if status == 429:
            self.esp_throttled.labels(target).inc()

    def guard_states(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Per target, what its guard reports (:meth:`EspGuard.state`)."""
        for target, state in states.items():
            self.circuit.labels(target).set(CIRCUIT.get(state["circuit"], 1.0))
            self.rate_scale.labels(target).set(state["rate_scale"])
            self.paused_seconds.labels(target).set(state["paused_for_s"])

    @staticmethod
    def replace(gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
        """Set a labelled gauge to exactly ``values``: series that are gone (a reason no longer seen) go too."""
        gauge.clear()
        for labels, value in values.items():
            gauge.labels(*labels).set(value)
