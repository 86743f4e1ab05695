"""Example-based tests of the step scheduler's rules, one rule per test."""

from __future__ import annotations

import pytest

from modelfleet.dataplane.batching.scheduler import (
    NeverFitsError,
    SchedRequest,
    Scheduler,
    SchedulerConfig,
    StepPlan,
)


def make(**overrides: int | None) -> Scheduler:
    values: dict[str, int | None] = {
        "kv_blocks": 100,
        "block_tokens": 16,
        "max_active": 8,
        "prefill_tokens_per_step": 64,
    }
    values.update(overrides)
    return Scheduler(SchedulerConfig(**values))  # type: ignore[arg-type]


def step(sched: Scheduler, finished: tuple[str, ...] = ()) -> tuple[list[str], StepPlan]:
    admitted = sched.admit()
    plan = sched.plan()
    sched.complete(plan, finished)
    return admitted, plan


@pytest.mark.parametrize(
    "field",
    [
        "kv_blocks",
        "block_tokens",
        "max_active",
        "prefill_tokens_per_step",
        "decode_tokens_per_step",
        "aging_steps",
        "starvation_steps",
    ],
)
@pytest.mark.parametrize("value", [0, -3, True, 1.5])
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    values: dict[str, object] = {"kv_blocks": 1, "block_tokens": 1, "max_active": 1, "prefill_tokens_per_step": 1}
    values[field] = value
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**values)  # type: ignore[arg-type]


def test_decode_width_defaults_to_max_active() -> None:
    assert SchedulerConfig(1, 1, 5, 1).decode_width == 5
    assert SchedulerConfig(1, 1, 5, 1, decode_tokens_per_step=2).decode_width == 2


def test_blocks_needed_rounds_up() -> None:
    sched = make(block_tokens=16)
    assert [sched.blocks_needed(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_never_fits_and_duplicates_and_bad_sizes_are_refused() -> None:
    sched = make(kv_blocks=4, block_tokens=16)
    with pytest.raises(NeverFitsError, match="needs 5 KV blocks"):
        sched.add(SchedRequest("huge", prompt_tokens=60, max_new_tokens=20))
    sched.add(SchedRequest("a", prompt_tokens=60, max_new_tokens=4))  # exactly 4 blocks: fits
    with pytest.raises(ValueError, match="duplicate"):
        sched.add(SchedRequest("a", prompt_tokens=1, max_new_tokens=1))
    with pytest.raises(ValueError, match="prompt_tokens"):
        sched.add(SchedRequest("b", prompt_tokens=0, max_new_tokens=1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        sched.add(SchedRequest("c", prompt_tokens=1, max_new_tokens=0))
    assert sched.waiting == 1


def test_add_stamps_the_arrival_step() -> None:
    sched = make()
    step(sched)
    step(sched)
    req = SchedRequest("a", 10, 2)
    sched.add(req)
    assert req.arrival_step == 2 == sched.now


def test_prefill_budget_is_respected_and_long_prompt_is_chunked() -> None:
    sched = make(prefill_tokens_per_step=64)
    sched.add(SchedRequest("long", prompt_tokens=150, max_new_tokens=3))
    sched.add(SchedRequest("short", prompt_tokens=10, max_new_tokens=3))
    plans = [step(sched)[1] for _ in range(3)]
    assert plans[0].prefill == (("long", 0, 64),)
    assert plans[1].prefill == (("long", 64, 64),)
    # the last 22 tokens of `long`, then `short` gets the rest of the budget
    assert plans[2].prefill == (("long", 128, 22), ("short", 0, 10))
    assert all(p.prefill_tokens <= 64 for p in plans)
    # the last chunk produced the first token; nobody decoded while prefilling
    assert sched.generated("long") == 1 and sched.generated("short") == 1
    assert all(p.decode == () for p in plans)
    assert step(sched)[1].decode == ("long", "short")


def test_oldest_admission_prefills_first_and_never_decodes_in_the_same_step() -> None:
    sched = make(prefill_tokens_per_step=8)
    sched.add(SchedRequest("a", prompt_tokens=4, max_new_tokens=5))
    step(sched)  # a: prompt done, first token
    sched.add(SchedRequest("b", prompt_tokens=20, max_new_tokens=5))
    _, plan = step(sched)
    assert plan.prefill == (("b", 0, 8),)
    assert plan.decode == ("a",)
    assert not {id for id, _, _ in plan.prefill} & set(plan.decode)


def test_sequence_finishes_at_max_new_tokens_and_returns_its_blocks() -> None:
    sched = make(kv_blocks=10, block_tokens=4)
    sched.add(SchedRequest("a", prompt_tokens=6, max_new_tokens=3))  # 9 tokens: 3 blocks
    admitted, _ = step(sched)
    assert admitted == ["a"] and sched.reserved_blocks == 3 and sched.generated("a") == 1
    step(sched)
    assert sched.generated("a") == 2 and not sched.last_finished
    step(sched)
    assert sched.last_finished == ("a",)
    assert not sched.is_active("a") and sched.reserved_blocks == 0 and sched.active == 0


def test_max_new_tokens_of_one_finishes_with_the_prefill() -> None:
    sched = make()
    sched.add(SchedRequest("a", prompt_tokens=5, max_new_tokens=1))
    _, plan = step(sched)
    assert plan.prefill == (("a", 0, 5),) and sched.last_finished == ("a",)


def test_runner_may_finish_early() -> None:
    sched = make()
    sched.add(SchedRequest("a", prompt_tokens=5, max_new_tokens=100))
    step(sched)
    step(sched, finished=("a",))
    assert sched.last_finished == ("a",) and sched.reserved_blocks == 0


def test_small_request_passes_a_big_one_that_does_not_fit() -> None:
    sched = make(kv_blocks=10, block_tokens=10, max_active=4)
    sched.add(SchedRequest("running", prompt_tokens=50, max_new_tokens=10))  # 6 blocks
    step(sched)
    sched.add(SchedRequest("big", prompt_tokens=50, max_new_tokens=10, priority=5))  # 6: does not fit in 4
    sched.add(SchedRequest("small", prompt_tokens=10, max_new_tokens=10))  # 2: fits
    assert sched.admit() == ["small"]
    assert sched.is_waiting("big") and sched.reserved_blocks == 8


def test_starving_request_becomes_a_head_of_line_reservation() -> None:
    sched = make(kv_blocks=10, block_tokens=10, max_active=4, starvation_steps=3)
    sched.add(SchedRequest("running", prompt_tokens=50, max_new_tokens=20))  # 7 blocks, runs ~20 steps
    step(sched)
    sched.add(SchedRequest("big", prompt_tokens=50, max_new_tokens=10))  # 6 blocks: waits
    sched.add(SchedRequest("small1", prompt_tokens=5, max_new_tokens=5))  # 1 block
    assert step(sched)[0] == ["small1"]  # big has waited 0 steps: small ones may pass
    step(sched)
    step(sched)
    # big has now waited 3 steps: a small one behind it must wait too
    sched.add(SchedRequest("small2", prompt_tokens=5, max_new_tokens=5))
    admissions: list[list[str]] = []
    while sched.is_waiting("big"):
        admissions.append(step(sched)[0])
    # nothing was admitted while big waited; once it fits, it goes first and small2 may follow
    assert all(a == [] for a in admissions[:-1])
    assert admissions[-1][0] == "big"
    assert len(admissions) > 10  # it really waited for `running` to finish


def test_head_of_line_reservation_does_not_block_requests_ahead_of_it() -> None:
    sched = make(kv_blocks=10, block_tokens=10, max_active=4, starvation_steps=1)
    sched.add(SchedRequest("running", prompt_tokens=50, max_new_tokens=20))  # 7 blocks
    step(sched)
    sched.add(SchedRequest("big", prompt_tokens=50, max_new_tokens=10))  # 6 blocks
    step(sched)
    sched.add(SchedRequest("urgent", prompt_tokens=5, max_new_tokens=5, priority=9))  # ahead of big in order
    assert sched.admit() == ["urgent"]


def test_priority_orders_admission_then_arrival() -> None:
    sched = make(max_active=2)
    sched.add(SchedRequest("low", 10, 5, priority=0))
    sched.add(SchedRequest("high", 10, 5, priority=2))
    sched.add(SchedRequest("mid", 10, 5, priority=1))
    sched.add(SchedRequest("high2", 10, 5, priority=2))
    assert sched.admit() == ["high", "high2"]


def test_ageing_lifts_a_long_waiting_low_priority_request() -> None:
    sched = make(max_active=1, aging_steps=4, starvation_steps=1000)
    sched.add(SchedRequest("holder", prompt_tokens=1, max_new_tokens=10))
    step(sched)
    sched.add(SchedRequest("old-low", 10, 5, priority=0))
    for _ in range(8):  # old-low waits 8 steps: effective priority 0 + 8 // 4 = 2
        step(sched)
    sched.add(SchedRequest("new-mid", 10, 5, priority=1))  # effective 1
    while sched.is_active("holder"):
        step(sched)
    assert sched.admit() == ["old-low"]


def test_equal_effective_priority_goes_by_arrival() -> None:
    sched = make(max_active=1, aging_steps=2, starvation_steps=1000)
    sched.add(SchedRequest("holder", prompt_tokens=1, max_new_tokens=10))
    step(sched)
    sched.add(SchedRequest("early-low", 10, 5, priority=0))
    step(sched)
    step(sched)
    sched.add(SchedRequest("late-high", 10, 5, priority=1))  # when holder leaves: 0 + 9 // 2 == 1 + 7 // 2
    while sched.is_active("holder"):
        step(sched)
    assert sched.admit() == ["early-low"]


def test_max_active_caps_admission() -> None:
    sched = make(max_active=2)
    for i in range(4):
        sched.add(SchedRequest(f"r{i}", 10, 5))
    assert sched.admit() == ["r0", "r1"]
    assert sched.admit() == []
    assert sched.active == 2 and sched.waiting == 2


def test_mark_cached_skips_prefill_but_keeps_one_token() -> None:
    sched = make(prefill_tokens_per_step=64)
    sched.add(SchedRequest("hit", prompt_tokens=100, max_new_tokens=5))
    sched.add(SchedRequest("full", prompt_tokens=30, max_new_tokens=5))
    assert sched.admit() == ["hit", "full"]
    sched.mark_cached("hit", 80)
    sched.mark_cached("full", 500)  # clamped: the last prompt token is still computed
    plan = sched.plan()
    assert plan.prefill == (("hit", 80, 20), ("full", 29, 1))
    sched.complete(plan)
    assert sched.generated("hit") == 1 and sched.generated("full") == 1
    with pytest.raises(ValueError, match="right after admission"):
        sched.mark_cached("hit", 10)
    with pytest.raises(KeyError):
        sched.mark_cached("nobody", 10)


def test_abort_returns_blocks_from_anywhere_and_ignores_unknown_ids() -> None:
    sched = make(kv_blocks=10, block_tokens=10, max_active=1)
    sched.add(SchedRequest("a", 50, 10))
    sched.add(SchedRequest("b", 10, 10))
    step(sched)
    assert sched.reserved_blocks == 6
    sched.abort("b")  # waiting
    sched.abort("a")  # active
    sched.abort("nobody")
    assert sched.reserved_blocks == 0 and sched.waiting == 0 and sched.active == 0


def test_abort_between_plan_and_complete_is_skipped() -> None:
    sched = make()
    sched.add(SchedRequest("a", 10, 5))
    sched.add(SchedRequest("b", 10, 5))
    sched.admit()
    plan = sched.plan()
    sched.abort("a")
    sched.complete(plan)
    assert not sched.is_active("a") and sched.generated("b") == 1


def test_complete_refuses_a_stale_or_repeated_plan() -> None:
    sched = make()
    sched.add(SchedRequest("a", 10, 5))
    sched.admit()
    plan = sched.plan()
    sched.complete(plan)
    with pytest.raises(ValueError, match="latest plan"):
        sched.complete(plan)
    assert sched.generated("a") == 1


def test_decode_width_is_shared_round_robin() -> None:
    sched = make(max_active=5, decode_tokens_per_step=2, prefill_tokens_per_step=100)
    for i in range(5):
        sched.add(SchedRequest(f"s{i}", prompt_tokens=4, max_new_tokens=100))
    step(sched)  # everyone prefilled and has its first token
    decodes = [step(sched)[1].decode for _ in range(5)]
    assert decodes == [("s0", "s1"), ("s2", "s3"), ("s4", "s0"), ("s1", "s2"), ("s3", "s4")]
    assert all(sched.generated(f"s{i}") == 3 for i in range(5))


def test_newly_prefilled_sequence_queues_behind_those_that_waited_longer() -> None:
    sched = make(max_active=4, decode_tokens_per_step=1, prefill_tokens_per_step=100)
    sched.add(SchedRequest("a", prompt_tokens=4, max_new_tokens=100))
    sched.add(SchedRequest("b", prompt_tokens=4, max_new_tokens=100))
    step(sched)  # a, b: first token at step 0
    sched.add(SchedRequest("c", prompt_tokens=4, max_new_tokens=100))
    assert step(sched)[1].decode == ("a",)  # c prefills, first token at step 1
    # b's last token (step 0) is the oldest; a and c both produced one at step 1, a was admitted first
    assert [step(sched)[1].decode for _ in range(4)] == [("b",), ("a",), ("c",), ("b",)]
