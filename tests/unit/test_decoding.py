"""Sampling and stop-string handling of local runners."""

from __future__ import annotations

import torch

from modelfleet.dataplane.runners.base import SamplingParams
from modelfleet.dataplane.runners.decoding import StopChecker, sample_next


def test_greedy_takes_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_next(logits, SamplingParams(max_tokens=1, temperature=0), None) == 1


def test_seeded_sampling_repeats_and_top_p_restricts():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.75, seed=7)

    def draw(seed: int, n: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [sample_next(logits, params, g) for _ in range(n)]

    assert draw(7, 50) == draw(7, 50)
    picks = draw(3, 400)
    assert set(picks) == {0, 1}  # 0.5 + 0.3 reaches 0.75; tokens 2 and 3 are cut
    free = [sample_next(logits, SamplingParams(max_tokens=1), torch.Generator().manual_seed(s)) for s in range(400)]
    assert {2, 3} & set(free)


def test_stop_checker_cuts_before_stop_and_holds_partial_matches():
    stop = StopChecker(("END",))
    assert stop.feed("hello E") == ("hello", False)  # " E" is held: it could start "END"
    assert stop.feed("N") == (" ", False)  # "EN" still could
    assert stop.feed("D and more") == ("", True)  # nothing of "END" or after it leaks


def test_stop_checker_releases_held_text_when_not_a_stop():
    stop = StopChecker(("END",))
    emitted = "".join(stop.feed(piece)[0] for piece in ["a E", "Nx", "yz"]) + stop.flush()
    assert emitted == "a ENxyz"


def test_without_stops_text_passes_through():
    stop = StopChecker(())
    assert stop.feed("abc") == ("abc", False)
    assert stop.flush() == ""
