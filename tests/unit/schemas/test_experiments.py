"""Experiment buckets: stable, split as configured, reshuffled by a new name, in every mapping."""

from collections import Counter

import pytest
from pydantic import ValidationError

from adapters.esps.fields import mapped, with_experiments
from adapters.esps.mailchimp.member import member_body
from schemas.experiments import Experiment
from schemas.profile import Profile

IDS = [f"p_{i:032x}" for i in range(20_000)]


def test_a_profile_keeps_its_bucket_while_the_experiment_does_not_change():
    a, b = Experiment(name="spring", splits={"a": 50, "b": 50}), Experiment(name="spring", splits={"a": 50, "b": 50})
    assert [a.bucket(i) for i in IDS[:500]] == [b.bucket(i) for i in IDS[:500]]


def test_the_splits_are_honoured_within_a_percent():
    e = Experiment(name="launch", splits={"control": 10, "a": 45, "b": 45})
    counts = Counter(e.bucket(i) for i in IDS)
    assert abs(counts["control"] / len(IDS) - 0.10) < 0.01 and abs(counts["a"] / len(IDS) - 0.45) < 0.015


def test_renaming_the_experiment_reshuffles():
    old, new = Experiment(name="spring", splits={"a": 50, "b": 50}), Experiment(name="spring-2", splits={"a": 50, "b": 50})
    moved = sum(old.bucket(i) != new.bucket(i) for i in IDS[:2000])
    assert 800 < moved < 1200  # about half change bucket, as two independent 50/50 draws do


def test_a_zero_weight_bucket_gets_nobody_and_bad_splits_are_refused():
    e = Experiment(name="x", splits={"off": 0, "on": 1})
    assert {e.bucket(i) for i in IDS[:300]} == {"on"}
    for splits in ({}, {"a": -1, "b": 2}, {"a": 0}):
        with pytest.raises(ValidationError):
            Experiment(name="x", splits=splits)


def test_every_mapping_that_names_the_trait_sends_the_bucket():
    e = Experiment(name="spring", splits={"a": 50, "b": 50})
    fields = with_experiments({"first_name": "FNAME", "ab_bucket": "ABBUCKET"}, {"ab_bucket": e})
    profile = Profile(id=IDS[7], email="ab@example.com")
    assert mapped(profile, fields)["ABBUCKET"] == e.bucket(IDS[7])
    assert member_body(profile, fields)["merge_fields"]["ABBUCKET"] == e.bucket(IDS[7])
