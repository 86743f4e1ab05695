"""Prompt-lookup speculative decoding: draft tokens from the sequence's own history.

Much generated text repeats what the prompt already holds (code being edited,
documents being summarised or quoted, structured output). If the last ``n``
tokens of a sequence occurred earlier, the tokens that followed them then are a
cheap guess at what comes next. The runner verifies a draft of ``k`` tokens in
one forward over ``k + 1`` positions and keeps the longest prefix the model
itself would have chosen, plus the model's own next token, so greedy output is
exactly the output without speculation; only the number of forwards changes.

:class:`DraftStats` switches speculation off for a sequence whose drafts are
mostly rejected, since a rejected draft costs a wider forward for nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def propose(history: Sequence[int], num_draft: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to ``num_draft`` tokens that followed the most recent earlier occurrence of the history's tail.

    Tries the longest tail first (``max_ngram`` tokens, down to ``min_ngram``):
    a longer match is a more specific context and a better predictor.
    """
    n_hist = len(history)
    if num_draft < 1:
        return []
    for n in range(min(max_ngram, n_hist - 1), min_ngram - 1, -1):
        tail = list(history[n_hist - n :])
        # the most recent occurrence that ends before the tail itself
        for start in range(n_hist - n - 1, -1, -1):
            if history[start] == tail[0] and list(history[start : start + n]) == tail:
                follow = history[start + n : start + n + num_draft]
                if follow:
                    return list(follow)
                break
    return []


def accept_greedy(draft: Sequence[int], choices: Sequence[int]) -> list[int]:
    """Tokens to keep after verifying ``draft``.

    ``choices[i]`` is the model's greedy token after the sequence plus
    ``draft[:i]`` (so there are ``len(draft) + 1`` of them). The kept tokens are
    the draft's longest prefix that agrees with the model, then the model's own
    token at the first disagreement (or after the whole draft): always at
    least one token, never one the model would not have produced.
    """
    if len(choices) != len(draft) + 1:
        raise ValueError("need one choice per draft token plus one")
    kept: list[int] = []
    for token, choice in zip(draft, choices, strict=False):
        kept.append(choice)
        if token != choice:
            return kept
    kept.append(choices[len(draft)])
    return kept


@dataclass
class DraftStats:
    """Acceptance of one sequence's drafts, and whether speculation still pays for it."""

    min_acceptance: float
    warmup_tokens: int = 16  # judge only after this many drafted tokens
    drafted: int = 0
    accepted: int = 0
    enabled: bool = True

    def record(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if self.drafted >= self.warmup_tokens and self.accepted < self.min_acceptance * self.drafted:
            self.enabled = False

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0
