"""A pure, deterministic step scheduler: who is admitted, who prefills, who decodes.

The torch runner's step loop and ``modelfleet replay`` drive the same object, so
what a replay shows is what the engine does. It knows nothing of tensors, event
loops or wall time: it counts *steps*, and ``now`` advances by one on each
:meth:`Scheduler.plan`. Identical calls give identical plans on any machine.

Rules:

* **Reservation, never over-commit.** Admitting a request reserves the KV blocks
  for its whole life, ``blocks_needed(prompt_tokens + max_new_tokens)``, so an
  admitted sequence can never run out of cache half way. The reservations never
  add up to more than ``kv_blocks``; a request leaves (finished or aborted) and
  its blocks are free for the next admission. A request larger than the whole
  cache is refused at :meth:`Scheduler.add` (:class:`NeverFitsError`) since it
  would wait forever.
* **Admission order.** Waiting requests are taken by effective priority
  (``priority + steps_waited // aging_steps``, higher first), then arrival step,
  then insertion order, until ``max_active`` sequences are active. Ageing keeps a
  stream of high-priority work from starving low-priority requests.
* **Small ones may pass a big one; a starving one may not be passed.** A request
  that does not fit in the unreserved blocks is skipped and the ones behind it
  are still considered, which keeps the cache busy. Once a request has waited
  ``starvation_steps`` it is a head-of-line reservation instead: nothing behind
  it is admitted until it fits. It will fit, because the active sequences finish
  and only the finitely many requests ahead of it can take their blocks.
* **Prefill.** Each step, sequences with prompt left get chunks oldest admission
  first until ``prefill_tokens_per_step`` tokens are spent; the last chunk may
  be partial and the prompt continues next step (chunked prefill). The step
  that computes the last prompt position also produces the first new token, as
  a real engine samples it from that position's logits.
* **Decode.** Sequences whose prompt is done and that have produced at least one
  but fewer than ``max_new_tokens`` tokens decode one token, at most
  ``decode_tokens_per_step`` (the width) of them. When more are eligible they
  take turns: a sequence that produced a token goes to the back of one line,
  and each step decodes the front of it (round robin). Sequences that decoded
  in the same step keep their order in the line; those whose first token came
  from prefill in that step queue behind them in admission order. So every
  sequence gets an equal share, and waits at most
  ``(max_active - 1) // width + 1`` steps between tokens. A sequence never
  prefills and decodes in the same step.
* **Finishing.** A sequence that has produced ``max_new_tokens`` tokens leaves in
  :meth:`Scheduler.complete`; the runner may finish one earlier (EOS, stop
  string) by naming it there, or drop one at any time with :meth:`Scheduler.abort`.

Costs per step: :meth:`Scheduler.plan` and :meth:`Scheduler.complete` touch only
the sequences in the plan (ordered dicts keep prefill and round-robin order, so
nothing is sorted or scanned per step);
:meth:`Scheduler.admit` sorts the waiting requests only when a sequence slot is
free.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field


class NeverFitsError(ValueError):
    """A request needs more KV blocks than the whole cache has."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Capacity and policy knobs; every one must be an integer >= 1."""

    kv_blocks: int
    block_tokens: int
    max_active: int
    prefill_tokens_per_step: int
    decode_tokens_per_step: int | None = None  # None: max_active
    aging_steps: int = 32
    starvation_steps: int = 256

    def __post_init__(self) -> None:
        for name in (
            "kv_blocks",
            "block_tokens",
            "max_active",
            "prefill_tokens_per_step",
            "decode_tokens_per_step",
            "aging_steps",
            "starvation_steps",
        ):
            value = getattr(self, name)
            if value is None and name == "decode_tokens_per_step":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def decode_width(self) -> int:
        """Most sequences that decode in one step."""
        return self.max_active if self.decode_tokens_per_step is None else self.decode_tokens_per_step


@dataclass
class SchedRequest:
    """What the scheduler needs to know of a request; ``arrival_step`` is set by :meth:`Scheduler.add`."""

    id: str
    prompt_tokens: int
    max_new_tokens: int
    priority: int = 0
    arrival_step: int | None = field(default=None, init=False)


@dataclass(frozen=True)
class StepPlan:
    """One step's work: prefill chunks ``(id, start position, tokens)`` and the ids that decode one token."""

    prefill: tuple[tuple[str, int, int], ...]
    decode: tuple[str, ...]

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, _, n in self.prefill)


@dataclass(slots=True)
class _Seq:
    id: str
    prompt: int
    max_new: int
    priority: int
    arrival: int
    order: int  # insertion order
    blocks: int
    computed: int = 0  # prompt tokens in the KV cache
    generated: int = 0


class Scheduler:
    """The rules of the module docstring over one KV cache; see there."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.now = 0
        # ids that left in the latest complete(): reached max_new_tokens, then the `finished` ones
        self.last_finished: tuple[str, ...] = ()
        self._width = config.decode_width
        self._waiting: dict[str, _Seq] = {}  # insertion order
        self._active: dict[str, _Seq] = {}  # admission order
        self._prefilling: dict[str, _Seq] = {}  # admission order; prompt left to compute
        self._decoding: dict[str, _Seq] = {}  # the round-robin line: front decodes next
        self._reserved = 0
        self._inserted = 0
        self._pending: StepPlan | None = None

    # ---- introspection --------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def reserved_blocks(self) -> int:
        return self._reserved

    @property
    def free_blocks(self) -> int:
        return self.config.kv_blocks - self._reserved

    def is_active(self, id: str) -> bool:
        return id in self._active

    def is_waiting(self, id: str) -> bool:
        return id in self._waiting

    def active_ids(self) -> tuple[str, ...]:
        """Active sequences in admission order."""
        return tuple(self._active)

    def waiting_ids(self) -> tuple[str, ...]:
        """Waiting requests in insertion order (not admission order; that depends on the step)."""
        return tuple(self._waiting)

    def generated(self, id: str) -> int:
        """Tokens an active sequence has produced (the first one comes with its last prefill chunk)."""
        return self._get_active(id).generated

    def prefilled(self, id: str) -> int:
        """Prompt tokens of an active sequence that are in the KV cache."""
        return self._get_active(id).computed

    def blocks_needed(self, tokens: int) -> int:
        """Blocks that ``tokens`` tokens occupy."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        return -(-tokens // self.config.block_tokens)

    # ---- lifecycle ------------------------------------------------------

    def add(self, req: SchedRequest) -> None:
        """Queue a request; its arrival step is ``now``."""
        for name in ("prompt_tokens", "max_new_tokens"):
            value = getattr(req, name)
            if value < 1:
                raise ValueError(f"request {req.id!r}: {name} must be >= 1, got {value}")
        if req.id in self._waiting or req.id in self._active:
            raise ValueError(f"duplicate request id {req.id!r}")
        blocks = self.blocks_needed(req.prompt_tokens + req.max_new_tokens)
        if blocks > self.config.kv_blocks:
            raise NeverFitsError(f"request {req.id!r} needs {blocks} KV blocks, the cache has {self.config.kv_blocks}")
        req.arrival_step = self.now
        self._waiting[req.id] = _Seq(
            id=req.id,
            prompt=req.prompt_tokens,
            max_new=req.max_new_tokens,
            priority=req.priority,
            arrival=self.now,
            order=self._inserted,
            blocks=blocks,
        )
        self._inserted += 1

    def admit(self) -> list[str]:
        """Move waiting requests into the active set; the admitted ids, in admission order."""
        room = self.config.max_active - len(self._active)
        if room <= 0 or not self._waiting:
            return []
        free = self.config.kv_blocks - self._reserved
        now, aging, starving = self.now, self.config.aging_steps, self.config.starvation_steps
        # arrival steps never decrease with insertion order, so `order` breaks ties by arrival, then insertion
        candidates = sorted(self._waiting.values(), key=lambda s: (-(s.priority + (now - s.arrival) // aging), s.order))
        admitted: list[str] = []
        for seq in candidates:
            if seq.blocks <= free:
                free -= seq.blocks
                del self._waiting[seq.id]
                self._active[seq.id] = seq
                self._prefilling[seq.id] = seq
                self._reserved += seq.blocks
                admitted.append(seq.id)
                room -= 1
                if room == 0:
                    break
            elif now - seq.arrival >= starving:
                break  # head-of-line reservation: nothing behind it goes first
        return admitted

    def mark_cached(self, id: str, tokens: int) -> None:
        """The first ``tokens`` prompt tokens are already cached (prefix hit); call right after admission.

        At least one prompt token is still computed, since its logits give the first new token.
        """
        seq = self._get_active(id)
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if seq.computed or seq.generated:
            raise ValueError(f"request {id!r} has started prefill; mark_cached belongs right after admission")
        seq.computed = min(tokens, seq.prompt - 1)

    def plan(self) -> StepPlan:
        """This step's prefill chunks and decodes; advances ``now``. Pass the plan to :meth:`complete`."""
        budget = self.config.prefill_tokens_per_step
        prefill: list[tuple[str, int, int]] = []
        for seq in self._prefilling.values():
            n = min(budget, seq.prompt - seq.computed)
            prefill.append((seq.id, seq.computed, n))
            budget -= n
            if budget == 0:
                break
        plan = StepPlan(prefill=tuple(prefill), decode=tuple(itertools.islice(self._decoding, self._width)))
        self.now += 1
        self._pending = plan
        return plan

    def complete(self, plan: StepPlan, finished: Iterable[str] = ()) -> None:
        """Apply the latest plan's progress, then let every id in ``finished`` leave.

        Sequences aborted since the plan are skipped. Applying any plan but the
        latest one (twice, or a stale one) raises ``ValueError`` and changes nothing.
        """
        if plan is not self._pending:
            raise ValueError("complete() takes the plan that the latest plan() returned, once")
        for id, start, _ in plan.prefill:
            seq = self._active.get(id)
            if seq is not None and seq.computed != start:
                raise ValueError(f"request {id!r} moved since the plan (prefill at {seq.computed}, plan says {start})")
        self._pending = None
        # Everyone who produced a token goes to the back of the round-robin line: the decoders in the
        # order they were picked (the line's order), then the first tokens, in admission order.
        produced: list[_Seq] = []
        for id in plan.decode:
            seq = self._decoding.pop(id, None)
            if seq is None:
                continue
            seq.generated += 1
            produced.append(seq)
        for id, _, n in plan.prefill:
            seq = self._active.get(id)
            if seq is None:
                continue
            seq.computed += n
            if seq.computed == seq.prompt:
                del self._prefilling[id]
                seq.generated = 1
                produced.append(seq)
        done: list[str] = []
        for seq in produced:
            if seq.generated >= seq.max_new:
                self._release(seq)
                done.append(seq.id)
            else:
                self._decoding[seq.id] = seq
        for id in finished:
            if self._remove(id):
                done.append(id)
        self.last_finished = tuple(done)

    def abort(self, id: str) -> None:
        """Drop a waiting or active request and free its blocks; an unknown id is a no-op."""
        self._remove(id)

    # ---- internals ------------------------------------------------------

    def _get_active(self, id: str) -> _Seq:
        seq = self._active.get(id)
        if seq is None:
            raise KeyError(f"request {id!r} is not active")
        return seq

    def _remove(self, id: str) -> bool:
        if self._waiting.pop(id, None) is not None:
            return True
        seq = self._active.get(id)
        if seq is None:
            return False
        self._release(seq)
        return True

    def _release(self, seq: _Seq) -> None:
        del self._active[seq.id]
        self._prefilling.pop(seq.id, None)
        self._decoding.pop(seq.id, None)
        self._reserved -= seq.blocks
