"""Which dead letters an operator's filters select: a pure predicate, every criterion combined with AND."""

import dramatiq
import pytest

from broker.dead_letters import DeadLetter, Selection, parse_age

NOW = 1_800_000_000.0


def letter(actor: str = "sync_profile", code: str = "esp_rejected", age_s: float | None = 60.0, queue: str = "p.sync",
           args: tuple = ("p_1", "klaviyo"), kwargs: dict | None = None) -> DeadLetter:
    message = dramatiq.Message(queue_name=queue + ".XQ", actor_name=actor, args=args, kwargs=kwargs or {}, options={})
    return DeadLetter(queue=queue, message_id=message.message_id, actor=actor, code=code, detail="", retries=0,
                      failed_at_ms=None if age_s is None else int((NOW - age_s) * 1000), message=message)


def test_an_empty_selection_selects_everything_and_says_it_is_not_narrowed():
    assert Selection().matches(letter(), NOW) and Selection().matches(letter(age_s=None), NOW)
    assert not Selection().narrowed
    assert Selection(actor="sync_profile").narrowed and Selection(ids=frozenset({"x"})).narrowed


def test_queue_matches_by_full_name_or_last_part():
    assert Selection(queue="sync").matches(letter(), NOW)
    assert Selection(queue="p.sync").matches(letter(), NOW)
    assert not Selection(queue="events").matches(letter(), NOW)


def test_actor_and_reason_match_exactly():
    assert Selection(actor="sync_profile", reason="esp_rejected").matches(letter(), NOW)
    assert not Selection(actor="sync").matches(letter(), NOW)
    assert not Selection(reason="esp_rejected").matches(letter(code="unsupported_event"), NOW)


def test_age_window_is_half_open_and_letters_without_a_time_are_never_selected_by_age():
    two_hours = letter(age_s=7200)
    assert Selection(older_than_s=7200).matches(two_hours, NOW)
    assert not Selection(older_than_s=7201).matches(two_hours, NOW)
    assert Selection(newer_than_s=7201).matches(two_hours, NOW)
    assert not Selection(newer_than_s=7200).matches(two_hours, NOW)
    assert Selection(older_than_s=3600, newer_than_s=86400).matches(two_hours, NOW)
    assert not Selection(older_than_s=0).matches(letter(age_s=None), NOW)
    assert not Selection(newer_than_s=10**9).matches(letter(age_s=None), NOW)


def test_profile_and_target_come_from_a_single_profile_sync_only():
    assert Selection(profile="p_1", target="klaviyo").matches(letter(), NOW)
    assert Selection(target="klaviyo").matches(letter(actor="sync_urgent"), NOW)
    assert not Selection(profile="p_2").matches(letter(), NOW)
    assert not Selection(profile="p_1", target="mailchimp").matches(letter(), NOW)
    # The ESP target defaults to mailchimp, as the actor's own default.
    assert Selection(target="mailchimp").matches(letter(args=("p_1",)), NOW)
    # Other actors carry no profile or target: a profile filter never selects them.
    assert not Selection(profile="p_1").matches(letter(actor="process_event", queue="p.events", args=({"source": "x"},)), NOW)
    assert not Selection(target="klaviyo").matches(letter(actor="sync_batch", args=(["p_1"], "klaviyo")), NOW)


def test_ids_combine_with_the_filters():
    one = letter()
    assert Selection(ids=frozenset({one.message_id}), target="klaviyo").matches(one, NOW)
    assert not Selection(ids=frozenset({one.message_id}), target="sendgrid").matches(one, NOW)
    assert not Selection(ids=frozenset({"other"}), target="klaviyo").matches(one, NOW)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 604800), ("1w", 604800),
                                                ("1.5h", 5400), (" 2H ", 7200)])
def test_ages_read_as_a_number_and_a_unit(text, seconds):
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["", "2", "h", "2x", "-1d", "2 days", "1h30m"])
def test_anything_else_is_not_an_age(text):
    with pytest.raises(ValueError, match="not an age"):
        parse_age(text)


def test_a_letter_for_the_targets_of_one_change_is_found_by_each_of_them():
    shared = letter(args=("p_1", ["mailchimp", "klaviyo"]))
    assert shared.sync_target() == {"profile_id": "p_1", "esp": "mailchimp,klaviyo"}
    assert Selection(target="klaviyo").matches(shared, NOW) and Selection(target="mailchimp").matches(shared, NOW)
    assert not Selection(target="sendgrid").matches(shared, NOW)
