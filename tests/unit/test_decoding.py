"""Sampling and stop-string handling of local runners."""

from __future__ import annotations

import torch

from modelfleet.dataplane.runners.base import SamplingParams
from modelfleet.dataplane.runners.decoding import LogitsAdjuster, StopChecker, sample_next


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


# ---- vLLM's sampling extensions: top_k, min_p, logit_bias, penalties, min_tokens -------------------

PROBS = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]))


def draws(params: SamplingParams, logits: torch.Tensor = PROBS, n: int = 400) -> set[int]:
    g = torch.Generator().manual_seed(11)
    return {sample_next(logits, params, g) for _ in range(n)}


def test_top_k_keeps_the_k_most_likely_and_one_is_greedy():
    assert draws(SamplingParams(max_tokens=1)) == {0, 1, 2, 3, 4}
    assert draws(SamplingParams(max_tokens=1, top_k=2)) == {0, 1}
    assert draws(SamplingParams(max_tokens=1, top_k=1, temperature=2.0)) == {0}
    assert draws(SamplingParams(max_tokens=1, top_k=5)) == {0, 1, 2, 3, 4}  # k >= vocabulary: all


def test_min_p_is_relative_to_the_most_likely_token():
    # 0.4 x 0.45 = 0.18: tokens 0.2 and above stay, 0.06 and 0.04 go
    assert draws(SamplingParams(max_tokens=1, min_p=0.45)) == {0, 1, 2}
    assert draws(SamplingParams(max_tokens=1, min_p=0.9)) == {0}


def test_top_p_after_top_k_is_a_share_of_what_top_k_kept():
    # top_k 2 renormalises 0.4/0.3 to 0.57/0.43: top_p 0.5 keeps only the first
    assert draws(SamplingParams(max_tokens=1, top_k=2, top_p=0.5)) == {0}
    assert draws(SamplingParams(max_tokens=1, top_k=3, top_p=0.6)) == {0, 1}


def adjusted(params: SamplingParams, logits: list[float], prompt=(), output=(), eos=()) -> list[float]:
    adjust = LogitsAdjuster.for_sequence(params, prompt, eos, torch.device("cpu"))
    assert adjust is not None
    return adjust(torch.tensor(logits), list(output)).tolist()


def test_plain_requests_get_no_adjuster():
    plain = SamplingParams(max_tokens=4, temperature=0.7, top_k=5, min_p=0.1, seed=3, stop_token_ids=frozenset({2}))
    assert LogitsAdjuster.for_sequence(plain, [1, 2], [0], torch.device("cpu")) is None


def test_logit_bias_adds_to_the_named_tokens():
    params = SamplingParams(max_tokens=1, temperature=0, logit_bias=((3, 100.0), (0, -100.0)))
    assert adjusted(params, [5.0, 1.0, 0.0, -2.0]) == [-95.0, 1.0, 0.0, 98.0]
    assert sample_next(torch.tensor([5.0, 1.0, 0.0, -2.0]), params, None, LogitsAdjuster(params, (), (), "cpu")) == 3


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    params = SamplingParams(max_tokens=1, repetition_penalty=2.0)
    # token 0 in the prompt, token 1 in the output, token 2 in neither, token 3 (negative) in the output
    assert adjusted(params, [4.0, 3.0, 2.0, -1.0], prompt=[0], output=[1, 3]) == [2.0, 1.5, 2.0, -2.0]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    params = SamplingParams(max_tokens=1, frequency_penalty=0.5, presence_penalty=1.0)
    # output: token 1 three times, token 2 once; token 0 only in the prompt is not penalised
    got = adjusted(params, [1.0, 1.0, 1.0, 1.0], prompt=[0], output=[1, 2, 1, 1])
    assert got == [1.0, 1.0 - 1.5 - 1.0, 1.0 - 0.5 - 1.0, 1.0]


def test_penalty_counts_follow_a_growing_output():
    params = SamplingParams(max_tokens=8, frequency_penalty=1.0)
    adjust = LogitsAdjuster(params, (), (), torch.device("cpu"))
    output = [2]
    assert adjust(torch.zeros(3), output).tolist() == [0.0, 0.0, -1.0]
    output += [2, 0]
    assert adjust(torch.zeros(3), output).tolist() == [-1.0, 0.0, -2.0]


def test_min_tokens_masks_end_of_sequence_and_stop_token_ids_until_reached():
    params = SamplingParams(max_tokens=8, temperature=0, min_tokens=2, stop_token_ids=frozenset({1}))
    logits = [1.0, 9.0, 8.0, 0.0]  # token 1 (a stop token) and 2 (end-of-sequence) lead
    adjust = LogitsAdjuster(params, (), (2,), torch.device("cpu"))
    assert sample_next(torch.tensor(logits), params, None, adjust, [5]) == 0  # 1 token so far: both masked
    assert sample_next(torch.tensor(logits), params, None, adjust, [5, 5]) == 1  # reached: free again


def test_stop_checker_does_not_look_for_stops_while_disarmed():
    stop = StopChecker(("END",))
    assert stop.feed("an END", armed=False) == ("an END", False)
    assert stop.feed(" and END", armed=True) == (" and ", True)
