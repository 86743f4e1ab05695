"""Property tests: the scheduler's invariants over random workloads, early finishes and aborts.

The harness keeps its own books (arrivals, reservations, positions) and checks
the scheduler against them after every call, so the checks do not trust the
scheduler's own counters.

No-starvation bound, derived from the rules (P is the highest priority in the
workload, g = aging_steps, S = starvation_steps, A = max_active, w = the decode
width). A request r arriving at step a with priority p:

* Any request arriving at or after ``a + (P - p + 1) * g`` has an effective
  priority strictly below r's forever, so it is behind r in admission order.
* From ``T = a + max(S, (P - p + 1) * g)`` on, r has waited at least S steps, so
  no request behind r is admitted before it; only requests that arrived by T can
  be active until r is admitted. Each step with an active sequence does at least
  one unit of work (a prompt token or a decode), so r is admitted within
  ``W + 1`` more steps, W being the prompt + max_new tokens of the requests that
  arrived by T.
* Its prefill competes only with older admissions, all of them arrivals by T:
  at most ``W + 1`` steps again.
* Then each of its ``max_new - 1`` remaining tokens comes within
  ``(A - 1) // w + 1`` steps (round robin).

So r completes by step ``T + 2 * (W + 1) + max_new * ((A - 1) // w + 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from modelfleet.dataplane.batching.scheduler import NeverFitsError, SchedRequest, Scheduler, SchedulerConfig


@dataclass(frozen=True)
class Req:
    id: str
    arrival: int
    prompt: int
    max_new: int
    priority: int


configs = st.builds(
    SchedulerConfig,
    kv_blocks=st.integers(1, 40),
    block_tokens=st.integers(1, 16),
    max_active=st.integers(1, 8),
    prefill_tokens_per_step=st.integers(1, 64),
    decode_tokens_per_step=st.none() | st.integers(1, 8),
    aging_steps=st.integers(1, 12),
    starvation_steps=st.integers(1, 40),
)

requests = st.lists(
    st.tuples(st.integers(0, 60), st.integers(1, 120), st.integers(1, 24), st.integers(0, 3)),
    max_size=30,
).map(lambda rows: [Req(f"r{i}", *row) for i, row in enumerate(sorted(rows, key=lambda r: r[0]))])


def admission_key(r: Req, now: int, aging: int) -> tuple[int, int, int]:
    """Effective priority (higher first), arrival, insertion order (the number in the id)."""
    return (-(r.priority + (now - r.arrival) // aging), r.arrival, int(r.id[1:]))


# (step, index): at that step, finish early / abort / prefix-cache the index-th candidate (modulo), if any
events = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 50)), max_size=12)


# Under pressure: a tight cache, a stream of small requests and a few that need most of it,
# so that queueing, passing and the head-of-line rule happen in most examples.
pressure_configs = st.builds(
    SchedulerConfig,
    kv_blocks=st.integers(8, 24),
    block_tokens=st.just(4),
    max_active=st.integers(2, 6),
    prefill_tokens_per_step=st.integers(4, 32),
    decode_tokens_per_step=st.none() | st.integers(1, 4),
    aging_steps=st.integers(2, 16),
    starvation_steps=st.integers(2, 16),
)
small = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(0, 3))
big = st.tuples(st.integers(16, 24), st.integers(4, 8), st.integers(0, 1))
pressure_requests = st.lists(
    st.tuples(st.integers(0, 40), small | small | small | big).map(lambda t: (t[0], *t[1])),
    min_size=10,
    max_size=40,
).map(lambda rows: [Req(f"r{i}", *row) for i, row in enumerate(sorted(rows, key=lambda r: r[0]))])


@settings(max_examples=200, deadline=None)
@given(config=configs, workload=requests, finishes=events, aborts=events, cached=events)
def test_invariants_hold_over_random_workloads(
    config: SchedulerConfig,
    workload: list[Req],
    finishes: list[tuple[int, int]],
    aborts: list[tuple[int, int]],
    cached: list[tuple[int, int]],
) -> None:
    run_and_check(config, workload, finishes, aborts, cached)


@settings(max_examples=200, deadline=None)
@given(config=pressure_configs, workload=pressure_requests, finishes=events, aborts=events)
def test_invariants_hold_under_kv_pressure(
    config: SchedulerConfig, workload: list[Req], finishes: list[tuple[int, int]], aborts: list[tuple[int, int]]
) -> None:
    run_and_check(config, workload, finishes, aborts, [])


def run_and_check(
    config: SchedulerConfig,
    workload: list[Req],
    finishes: list[tuple[int, int]],
    aborts: list[tuple[int, int]],
    cached: list[tuple[int, int]],
) -> None:
    sched = Scheduler(config)
    width = config.decode_width
    by_step: dict[int, list[Req]] = {}
    fits: list[Req] = []
    for req in workload:
        if sched.blocks_needed(req.prompt + req.max_new) <= config.kv_blocks:
            fits.append(req)
            by_step.setdefault(req.arrival, []).append(req)
    top = max((r.priority for r in fits), default=0)
    info = {r.id: r for r in fits}
    blocks = {r.id: sched.blocks_needed(r.prompt + r.max_new) for r in fits}

    position: dict[str, int] = {}  # prompt tokens computed, per active id
    made: dict[str, int] = {}  # tokens produced, per active id
    admitted_at: dict[str, int] = {}
    last_token: dict[str, int] = {}  # step of the latest token, per active id
    done_at: dict[str, int] = {}
    aborted: set[str] = set()
    last_arrival = max(by_step, default=0)
    cap = last_arrival + 2 + sum(r.prompt + r.max_new for r in fits)

    step = 0
    while step <= last_arrival or sched.waiting or sched.active:
        assert step < cap, "no progress: the work-conservation bound was exceeded"
        for req in by_step.get(step, ()):
            sched.add(SchedRequest(req.id, req.prompt, req.max_new, req.priority))
        waiting_before = [i for i in info if sched.is_waiting(i)]
        free_before = sched.free_blocks

        admitted = sched.admit()

        # -- admission: capacity, order, and nobody ahead that fit was passed over
        assert sched.active <= config.max_active
        assert sched.reserved_blocks <= config.kv_blocks
        assert sum(blocks[i] for i in sched.active_ids()) == sched.reserved_blocks

        key = {i: admission_key(info[i], step, config.aging_steps) for i in waiting_before}.__getitem__
        # Checked: admitted ids come out in admission order (effective priority, arrival,
        # insertion); and a request still waiting that is ahead of an admitted one in that order
        # did not fit in the blocks left free when the admitted one was taken.
        assert [key(i) for i in admitted] == sorted(key(i) for i in admitted)
        free = free_before
        for i in admitted:
            for j in waiting_before:
                if sched.is_waiting(j) and key(j) < key(i):
                    assert blocks[j] > free, f"{j} fit ({blocks[j]} <= {free}) but {i} went first"
            free -= blocks[i]
        # Checked: a request that has waited starvation_steps and does not fit holds everything
        # behind it back.
        starving = [
            j
            for j in sorted(waiting_before, key=key)
            if step - info[j].arrival >= config.starvation_steps and sched.is_waiting(j)
        ]
        if starving:
            assert all(key(i) < key(starving[0]) for i in admitted)
        for i in admitted:
            admitted_at[i] = step
            position[i] = 0
            made[i] = 0
        marked: set[str] = set()
        for at, pick in cached:
            if at == step and admitted and admitted[pick % len(admitted)] not in marked:
                target = admitted[pick % len(admitted)]
                marked.add(target)
                sched.mark_cached(target, pick * 3)
                position[target] = min(pick * 3, info[target].prompt - 1)

        plan = sched.plan()

        # -- plan: budgets, widths, chunk positions, no sequence twice
        assert plan.prefill_tokens <= config.prefill_tokens_per_step
        assert len(plan.decode) <= width
        prefill_ids = [i for i, _, _ in plan.prefill]
        assert len(set(prefill_ids)) == len(prefill_ids) and len(set(plan.decode)) == len(plan.decode)
        assert not set(prefill_ids) & set(plan.decode)
        for i, start, n in plan.prefill:
            assert start == position[i] and n >= 1 and start + n <= info[i].prompt
        for i in plan.decode:
            assert position[i] == info[i].prompt and 1 <= made[i] < info[i].max_new
        eligible = [i for i in sched.active_ids() if position[i] == info[i].prompt and made[i] >= 1]
        assert len(plan.decode) == min(width, len(eligible))
        # round robin: nobody waits more than (max_active - 1) // width + 1 steps between tokens
        for i in eligible:
            assert i in plan.decode or step - last_token[i] < (config.max_active - 1) // width + 1
        if prefill_ids and plan.prefill_tokens < config.prefill_tokens_per_step:
            # budget left over means every sequence with prompt left got all of it
            assert all(position[i] + n == info[i].prompt for i, _, n in plan.prefill)
            assert all(position[i] == info[i].prompt or i in prefill_ids for i in sched.active_ids())

        early = [sched.active_ids()[pick % sched.active] for at, pick in finishes if at == step and sched.active]
        sched.complete(plan, early)

        for i, _, n in plan.prefill:
            position[i] += n
            if position[i] == info[i].prompt:
                made[i] = 1
                last_token[i] = step
        for i in plan.decode:
            made[i] += 1
            last_token[i] = step
        expected_done = [i for i in [*plan.decode, *prefill_ids] if made.get(i, 0) >= info[i].max_new]
        assert set(sched.last_finished) == set(expected_done) | set(early)
        for i in sched.last_finished:
            done_at[i] = step
            del position[i], made[i]
        for at, pick in aborts:
            candidates = [*sched.active_ids(), *sched.waiting_ids()]
            if at == step and candidates:
                victim = candidates[pick % len(candidates)]
                sched.abort(victim)
                aborted.add(victim)
                position.pop(victim, None)
                made.pop(victim, None)
        assert sched.reserved_blocks <= config.kv_blocks
        assert sum(blocks[i] for i in sched.active_ids()) == sched.reserved_blocks
        step += 1

    # -- the end: everyone finished or was aborted, every block is back
    assert sched.reserved_blocks == 0 and sched.free_blocks == config.kv_blocks
    assert set(done_at) | aborted == set(info)
    assert all(i in done_at for i in admitted_at if i not in aborted)
    # -- no starvation: the bound of the module docstring
    per_token = (config.max_active - 1) // width + 1
    for r in fits:
        if r.id in aborted:
            continue
        t = r.arrival + max(config.starvation_steps, (top - r.priority + 1) * config.aging_steps)
        work = sum(q.prompt + q.max_new for q in fits if q.arrival <= t)
        bound = t + 2 * (work + 1) + r.max_new * per_token
        assert done_at[r.id] <= bound, f"{r.id} finished at {done_at[r.id]}, bound {bound}"


@settings(max_examples=100, deadline=None)
@given(config=configs, prompt=st.integers(1, 2000), max_new=st.integers(1, 500))
def test_never_fits_exactly_when_the_reservation_exceeds_the_cache(
    config: SchedulerConfig, prompt: int, max_new: int
) -> None:
    sched = Scheduler(config)
    need = -(-(prompt + max_new) // config.block_tokens)
    try:
        sched.add(SchedRequest("r", prompt, max_new))
    except NeverFitsError:
        assert need > config.kv_blocks
    else:
        assert need <= config.kv_blocks and sched.waiting == 1
