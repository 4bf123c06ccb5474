"""The sync policy alone decides how a change goes to a target; these are its rules, without I/O."""

from datetime import timedelta

from schemas.sync import SyncState
from workers.sync import policy
from workers.sync.policy import Route


def test_consent_changes_erasures_and_sends_alone_always_go_now():
    for flags in ({"urgent": True, "alone": False}, {"urgent": False, "alone": True}):
        assert policy.route(**flags, backlog=10_000, bulk_backlog=200, prefers_bulk=True) is Route.SEND


def test_a_big_backlog_is_left_to_the_sweeper_and_a_middling_one_is_taken_along():
    common = {"urgent": False, "alone": False, "bulk_backlog": 200, "prefers_bulk": False}
    assert policy.route(backlog=200, **common) is Route.LEAVE
    assert policy.route(backlog=policy.TAKE_ALONG_MIN, **common) is Route.TAKE_ALONG
    assert policy.route(backlog=policy.TAKE_ALONG_MIN - 1, **common) is Route.SEND


def test_an_esp_whose_writes_are_all_jobs_takes_others_along_even_when_few_wait():
    assert policy.route(urgent=False, alone=False, backlog=0, bulk_backlog=200, prefers_bulk=True) is Route.TAKE_ALONG


def test_with_sync_rounds_a_middling_backlog_goes_in_the_rounds_and_a_big_one_is_still_left_to_the_sweeper():
    for prefers_bulk in (False, True):
        common = {"urgent": False, "alone": False, "bulk_backlog": 200, "prefers_bulk": prefers_bulk, "gathered": True}
        assert policy.route(backlog=policy.TAKE_ALONG_MIN, **common) is Route.SEND
        assert policy.route(backlog=0, **common) is Route.SEND
        assert policy.route(backlog=200, **common) is Route.LEAVE


def test_take_along_leaves_room_for_the_profile_itself():
    assert policy.take_along_limit(500) == 499
    assert policy.take_along_limit(30_000) == policy.TAKE_ALONG
    assert policy.sweep_limit(500) == 2_500 and policy.sweep_limit(10) == 50


def test_a_batch_sends_only_what_the_target_lacks_and_address_work_goes_alone():
    batch = policy.plan_batch({
        "new": SyncState(member={"e": 1}, member_hash="h1"),
        "held": SyncState(member={"e": 2}, member_hash="h2", sent_hash="h2"),
        "gone": SyncState(member=None),
        "erased": SyncState(member=None, erase=["a@example.com"]),
        "moved": SyncState(member={"e": 3}, member_hash="h3", retire=["old@example.com"]),
    })
    assert list(batch.sent) == ["new"] and sorted(batch.alone) == ["erased", "moved"] and sorted(batch.idle) == ["gone", "held"]


def test_a_refused_member_is_sent_again_only_for_a_replayed_dead_letter():
    refused = SyncState(member={"e": 1}, member_hash="h1", failed_hash="h1")
    assert not policy.needs_send(refused, retry_refused=False) and policy.needs_send(refused, retry_refused=True)
    changed = refused.model_copy(update={"member_hash": "h2"})
    assert policy.needs_send(changed, retry_refused=False)
    assert not policy.needs_send(SyncState(member={"e": 1}, member_hash="h1", sent_hash="h1"), retry_refused=True)


def test_the_sweeper_takes_a_heavy_backlog_at_once_and_in_batches():
    grace = timedelta(seconds=10)
    assert policy.sweep_grace(199, 200, grace) == grace and policy.sweep_grace(200, 200, grace) == timedelta(0)
    assert not policy.sweep_in_bulk(policy.BATCH_MIN - 1) and policy.sweep_in_bulk(policy.BATCH_MIN)
    assert [len(b) for b in policy.batches([str(n) for n in range(1_201)], 500)] == [500, 500, 201]


def test_read_backs_back_off_and_delete_again_after_enough_of_them():
    assert [policy.verify_delay_ms(n) for n in (1, 2, 3)] == [1000, 2000, 3000]
    assert not policy.delete_again(policy.VERIFY_CHECKS - 1) and policy.delete_again(policy.VERIFY_CHECKS)

