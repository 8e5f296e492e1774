"""The replay against the counts it made before it was made faster (make_replay_golden.py)."""

import json

import pytest
from make_replay_golden import COUNTS, counts_of, replay_cases

GOLDEN = json.loads(COUNTS.read_text())
CASES = dict(replay_cases())


def test_every_golden_case_is_replayed():
    assert sorted(CASES) == sorted(GOLDEN)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_replay_counts_match_the_golden_counts(name):
    assert counts_of(CASES[name]) == GOLDEN[name]
