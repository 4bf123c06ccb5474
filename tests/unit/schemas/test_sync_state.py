"""The typed sync state: what it says about a target, and what a merge or an erasure carries over."""

from datetime import datetime, timedelta, timezone

from schemas.sync import InFlight, Stored, SyncState, in_flight

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)


def test_held_refused_and_address_work_read_from_the_stored_fields():
    assert SyncState().held and not SyncState().has_address_work
    state = SyncState(member={"e": 1}, member_hash="h1", sent_hash="h0", failed_hash="h1", retire=["old@example.com"])
    assert not state.held and state.refused and state.has_address_work
    assert SyncState.model_validate({"member": None, "unknown_later_field": 1}).member is None


def test_a_contact_may_be_held_once_sent_or_while_a_send_is_in_flight():
    assert SyncState(sent_hash="h").may_hold_contact(NOW)
    assert SyncState(sending_until=NOW + timedelta(seconds=1)).may_hold_contact(NOW)
    assert not SyncState(sending_until=NOW - timedelta(seconds=1)).may_hold_contact(NOW)


def test_in_flight_sends_of_other_profiles_are_carried_per_target():
    mid_send = Stored(version=3, esp={"mc": SyncState(sending_until=NOW, jobs=["j1"]), "sg": SyncState(sent_hash="h")})
    fenced = Stored(version=1, esp={"mc": SyncState(jobs=["j2"], fence_until=NOW + timedelta(seconds=5))})
    assert in_flight([mid_send, fenced, Stored()], ["mc", "sg", "kl"]) == {
        "mc": InFlight(jobs=("j1", "j2"), until=NOW + timedelta(seconds=5))}
