"""Prompt-lookup drafts and greedy acceptance (pure functions; the model-level check is in tests/integration)."""

from __future__ import annotations

import pytest

from modelfleet.dataplane.runners.ngram import DraftStats, accept_greedy, propose


def test_propose_continues_the_most_recent_earlier_match() -> None:
    history = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose(history, 2) == [7, 8]  # the later "1 2 3" wins over the first
    assert propose(history, 10) == [7, 8, 5, 1, 2, 3]


def test_propose_prefers_a_longer_context() -> None:
    # "3" alone last appeared before 4; "2 3" appeared before 6
    history = [2, 3, 6, 6, 5, 3, 4, 0, 2, 3]
    assert propose(history, 1, max_ngram=2) == [6]
    assert propose(history, 1, max_ngram=1) == [4]


def test_propose_without_a_match_or_budget_is_empty() -> None:
    assert propose([1, 2, 3, 4], 3) == []
    assert propose([5], 3) == []
    assert propose([1, 2, 1, 2], 0) == []


def test_accept_greedy_keeps_the_agreeing_prefix_and_the_models_token() -> None:
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted, plus a bonus token
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # stops at the first disagreement
    assert accept_greedy([5], [4, 1]) == [4]
    assert accept_greedy([], [3]) == [3]
    with pytest.raises(ValueError):
        accept_greedy([1, 2], [1, 2])


def test_draft_stats_switch_off_below_the_acceptance_floor() -> None:
    stats = DraftStats(min_acceptance=0.5, warmup_tokens=8)
    stats.record(4, 0)
    assert stats.enabled  # too early to judge
    stats.record(4, 1)
    assert not stats.enabled and stats.acceptance == 1 / 8
    good = DraftStats(min_acceptance=0.5, warmup_tokens=8)
    for _ in range(5):
        good.record(4, 3)
    assert good.enabled
