"""The alert conditions and the freshness percentile: pure."""

import math

from adapters.metrics import Metrics
from workers.sync.alerts import Bounds, FreshnessWindow, Readings, firing, p99

BOUNDS = Bounds(dead_letters=10, circuit_s=300, freshness_p99_s=60)


def test_dead_letters_alert_from_the_threshold_on():
    assert firing(Readings(now=0, dead_letters=9), BOUNDS, frozenset()) == {}
    assert firing(Readings(now=0, dead_letters=10), BOUNDS, frozenset()) == {"dead_letters": {"dead_letters": 10, "threshold": 10}}


def test_a_circuit_alerts_only_once_it_has_not_closed_for_longer_than_the_bound():
    assert firing(Readings(now=299, dead_letters=0, not_closed_since={"mailchimp": 0}), BOUNDS, frozenset()) == {}
    alerts = firing(Readings(now=300, dead_letters=0, not_closed_since={"mailchimp": 0, "klaviyo": 200}), BOUNDS, frozenset())
    assert alerts == {"circuit_open:mailchimp": {"target": "mailchimp", "open_for_s": 300, "bound_s": 300}}


def test_freshness_over_the_bound_alerts_and_a_quiet_check_keeps_the_episode_as_it_was():
    over = firing(Readings(now=0, dead_letters=0, freshness_p99_s={"mailchimp": 61, "klaviyo": 5}), BOUNDS, frozenset())
    assert set(over) == {"freshness:mailchimp"}
    quiet = Readings(now=0, dead_letters=0, freshness_p99_s={"mailchimp": None})
    assert set(firing(quiet, BOUNDS, frozenset({"freshness:mailchimp"}))) == {"freshness:mailchimp"}
    assert firing(quiet, BOUNDS, frozenset()) == {}


def test_p99_is_the_upper_bound_of_the_bucket_holding_the_99th_percentile():
    assert p99([1, 2, 5], [0, 0, 0, 0]) is None
    assert p99([1, 2, 5], [99, 1, 0, 0]) == 1
    assert p99([1, 2, 5], [98, 1, 1, 0]) == 2
    assert p99([1, 2, 5], [50, 0, 0, 50]) == math.inf


def test_the_freshness_window_reads_only_what_was_observed_since_the_last_reading():
    metrics = Metrics()
    window = FreshnessWindow(metrics)
    assert window.p99s(["mailchimp"]) == {"mailchimp": None}
    for _ in range(100):
        metrics.freshness.labels("mailchimp").observe(90)
    assert window.p99s(["mailchimp"]) == {"mailchimp": 120.0}
    assert window.p99s(["mailchimp"]) == {"mailchimp": None}  # nothing new
    for _ in range(100):
        metrics.freshness.labels("mailchimp").observe(0.3)
    assert window.p99s(["mailchimp"]) == {"mailchimp": 0.5}
