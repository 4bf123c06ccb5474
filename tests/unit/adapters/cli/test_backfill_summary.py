"""The backfill's tally, its idle rule, its summary arithmetic and its progress display, without services."""

import io

from adapters.cli.progress import Progress
from adapters.cli.summary import Quiet, Tally, esp_requests, pull_summary, render, still_merging, store_requests


def pulled() -> Tally:
    tally = Tally(started=100.0)
    tally.begin("customers", 100.0)
    for records in (250, 250, 10):
        tally.add("customers", records)
    tally.end("customers", 110.0)
    tally.begin("orders", 110.0)
    tally.add("orders", 90)
    tally.end("orders", 112.0)
    return tally


def test_the_tally_counts_records_and_pages_with_rates_per_resource():
    tally = pulled()
    assert (tally.total, tally.pages) == (600, {"customers": 3, "orders": 1})
    assert tally.rate("customers", now=500.0) == 51.0  # over its own pull, once ended
    assert tally.line("orders", 500.0) == "orders: 90 records, 1 pages, 45.0/s"
    summary = pull_summary(tally, now=500.0, checkpoints={"customers": "2026-01-01T00:00:00+00:00"})
    assert summary["records"] == summary["events_published"] == 600
    assert (summary["pages"], summary["elapsed_s"], summary["events_per_s"]) == (4, 12.0, 50.0)
    assert summary["resources"]["customers"] == {"records": 510, "pages": 3, "records_per_s": 51.0,
                                                 "checkpoint": "2026-01-01T00:00:00+00:00"}


def test_a_resource_with_nothing_to_pull_has_no_rate_until_time_passed():
    tally = Tally(started=5.0)
    tally.begin("customers", 5.0)
    assert tally.rate("customers", 5.0) is None and tally.line("customers", 5.0) == "customers: 0 records, 0 pages"


def test_done_only_after_idle_held_for_the_whole_settle_time():
    quiet = Quiet(settle=3.0)
    assert not quiet.observe(True, 10.0)
    assert not quiet.observe(False, 12.0)  # a change: the settle time starts again
    assert not quiet.observe(True, 13.0)
    assert not quiet.observe(True, 15.9)
    assert quiet.observe(True, 16.0)
    assert quiet.since == 13.0  # when the work was done, not when the wait ended


def test_events_still_merge_while_the_events_queue_or_its_delay_queue_holds_any():
    assert still_merging({"p.events": 3}, "p.events") and still_merging({"p.events.DQ": 1}, "p.events")
    # Sync messages left once nothing is pending find their profile sent; dead letters wait for an operator.
    assert not still_merging({"p.sync": 700, "p.events.XQ": 2, "p.events": 0}, "p.events")


def test_store_requests_per_event_leave_out_the_commands_own_readings():
    assert store_requests(1_000, 5_200, own=200, events=1_000) == {"requests": 4_000, "per_event": 4.0}
    assert store_requests(None, 5_200, own=0, events=10) == {"requests": None, "per_event": None}
    assert store_requests(10, 10, own=0, events=0) == {"requests": 0, "per_event": None}


def test_esp_requests_set_writes_against_the_minimum_per_account():
    report = esp_requests(
        accounts={"mailchimp": "mc:1", "klaviyo": "kl:1", "klaviyo-eu": "kl:1"},
        batch_limits={"mailchimp": 500, "klaviyo": 100, "klaviyo-eu": 100},
        synced={"mailchimp": 1_001, "klaviyo": 150, "klaviyo-eu": 0},
        before={"mc:1": {"POST": 4, "GET": 10}},
        after={"mc:1": {"POST": 9, "PUT": 2, "GET": 30}, "kl:1": {"POST": 3, "GET": 7}},
    )
    assert report["mailchimp"] == {"profiles_synced": 1_001, "batch_limit": 500, "minimum_requests": 3, "write_requests": 7,
                                   "writes_per_minimum": 2.33, "requests": {"GET": 20, "POST": 5, "PUT": 2}}
    # Two targets on one key share the account's count: reported together, minimums added.
    shared = report["klaviyo+klaviyo-eu"]
    assert (shared["profiles_synced"], shared["minimum_requests"], shared["write_requests"]) == (150, 2, 3)


def test_nothing_synced_has_no_ratio():
    report = esp_requests({"mailchimp": "mc"}, {"mailchimp": 500}, {"mailchimp": 0}, {}, {})
    assert report["mailchimp"]["minimum_requests"] == 0 and report["mailchimp"]["writes_per_minimum"] is None


def test_the_summary_for_people_names_every_number():
    summary = pull_summary(pulled(), 500.0, {})
    summary["wait"] = {"drained": True, "elapsed_s": 30.0, "events_per_s": 20.0, "pending": {"mailchimp": 0},
                       "store": {"requests": 2_400, "per_event": 4.0}, "dead_letters": {"p.events": 0, "p.sync": 0},
                       "esp": esp_requests({"mailchimp": "mc"}, {"mailchimp": 500}, {"mailchimp": 510}, {}, {"mc": {"POST": 3, "GET": 9}})}
    assert render(summary) == [
        "customers: 510 records in 3 pages (51.0/s)",
        "orders: 90 records in 1 pages (45.0/s)",
        "published 600 events in 12.0 s (50.0 events/s)",
        "merged and synced after 30.0 s (20.0 events/s end to end)",
        "store: 2,400 requests, 4.00 per event",
        "mailchimp: 510 profiles synced, 3 write requests (minimum 2 at 500 per request)",
    ]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_progress_is_a_plain_line_every_n_pages():
    out, clock = io.StringIO(), Clock()
    progress = Progress(Tally(0.0), out, every=2, status_every_s=10, clock=clock)
    assert not progress.live
    with progress:
        progress.begin("customers")
        for _ in range(5):
            clock.now += 1
            progress.page("customers", 250)
        progress.end("customers")
        for t in (6, 7, 17):
            clock.now = t
            progress.status("12 queued")
    assert out.getvalue().splitlines() == [
        "customers: 500 records, 2 pages, 250.0/s",
        "customers: 1,000 records, 4 pages, 250.0/s",
        "customers: 1,250 records, 5 pages, 250.0/s (done)",
        "waiting: 12 queued",
        "waiting: 12 queued",
    ]


def test_on_a_terminal_progress_is_a_live_bar():
    out = io.StringIO()
    progress = Progress(Tally(0.0), out, terminal=True)
    with progress:
        progress.begin("orders")
        progress.page("orders", 250)
        progress.end("orders")
        progress.status("settling")
    shown = out.getvalue()
    assert progress.live and "\x1b[" in shown and "250 records" in shown and "waiting: settling" in shown
