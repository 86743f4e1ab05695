"""Typed input of the release gate: one observation per served request, and the gate policy.

An observation is what one replica did with one request: whether it succeeded, how long it took,
what it produced (token ids for generation, a numeric vector for embeddings) and where it ran
(runtime, accelerator, replica, route, model version). The baseline and the candidate each give a
list; the gate joins them by ``request_id``.

Every number is strict (``"12"`` is not 12, ``true`` is not 1) and finite, and an unknown policy
field is an error, because a misspelt threshold silently replaced by its default would let a bad
release through. Observations ignore unknown fields, so richer logs can be passed as they are.
:func:`parse_gate_input` turns every problem into one :class:`RolloutInputError` whose message
names the field path (``candidate[3].latency_ms: must be >= 0``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

NonNegFloat = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]
Ratio = Annotated[float, Field(strict=True, ge=1, allow_inf_nan=False)]
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
Label = Annotated[str, Field(strict=True, min_length=1)]

# The signals a policy can require evidence for; their observation field is the same name.
EvidenceSignal = Literal["ttft_ms", "itl_ms", "kv_usage"]


class RolloutInputError(ValueError):
    """Gate input that cannot be judged, with the offending field named."""


class Observation(BaseModel):
    """One request as one side (baseline or candidate) served it."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    request_id: Label = Field(description="joins the baseline and candidate observation of the same request")
    ok: Annotated[bool, Field(strict=True)] = Field(description="the request completed without an error")
    latency_ms: NonNegFloat | None = Field(default=None, description="end-to-end latency; required when ok")
    output_tokens: list[Annotated[int, Field(strict=True)]] | None = Field(
        default=None, description="generated token ids (greedy generation: compared exactly)"
    )
    output_vector: list[Annotated[float, Field(strict=True, allow_inf_nan=False)]] | None = Field(
        default=None, description="numeric output (embeddings, scores): compared within the policy's tolerance"
    )
    ttft_ms: NonNegFloat | None = Field(default=None, description="time to first token")
    itl_ms: list[NonNegFloat] | None = Field(
        default=None, description="inter-token gaps, one per token after the first"
    )
    model: Label | None = Field(default=None, description="served model name (tolerance rules match on it)")
    model_version: Label | None = Field(default=None, description="model version or revision")
    runtime: Label | None = Field(default=None, description="serving runtime: torch, vllm, sglang, ...")
    accelerator: Label | None = Field(default=None, description="accelerator type: cpu, h100, ...")
    replica: Label | None = Field(default=None, description="replica (pod) that served the request")
    route: Label | None = Field(default=None, description="route or routing policy that chose the replica")
    queue_depth: NonNegInt | None = Field(default=None, description="requests queued on the replica at admission")
    kv_usage: Fraction | None = Field(default=None, description="fraction of the replica's KV cache in use (0-1)")
    prompt_tokens: NonNegInt | None = None
    completion_tokens: NonNegInt | None = None


class Tolerance(BaseModel):
    """Numeric equality for output vectors: ``|candidate - baseline| <= abs_tol + rel_tol * |baseline|``."""

    model_config = ConfigDict(extra="forbid")

    abs_tol: NonNegFloat = Field(default=1e-5, description="absolute tolerance per element")
    rel_tol: NonNegFloat = Field(default=1e-4, description="tolerance per element relative to the baseline value")


class ToleranceRule(Tolerance):
    """A tolerance for the candidate observations whose fields match; an unset field matches anything."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Label | None = None
    model_version: Label | None = None
    runtime: Label | None = None
    accelerator: Label | None = None

    def specificity(self) -> int:
        return sum(v is not None for v in (self.model, self.model_version, self.runtime, self.accelerator))

    def matches(self, obs: Observation) -> bool:
        scoped = (
            (self.model, obs.model),
            (self.model_version, obs.model_version),
            (self.runtime, obs.runtime),
            (self.accelerator, obs.accelerator),
        )
        return all(want is None or want == have for want, have in scoped)


class GatePolicy(BaseModel):
    """Thresholds of the gate. Ratios compare candidate p95 with baseline p95 (1.2 = 20 % slower allowed)."""

    model_config = ConfigDict(extra="forbid")

    min_matched: Annotated[int, Field(strict=True, ge=1)] = Field(
        default=20, description="fewest requests present in both sides; fewer holds"
    )
    max_mismatch_rate: Fraction = Field(
        default=0.0,
        description="largest share of matched successful requests whose outputs may differ; above rolls back",
    )
    max_error_rate_increase: Fraction = Field(
        default=0.01, description="largest candidate error rate minus baseline error rate; above rolls back"
    )
    max_latency_p95_ratio: Ratio = Field(
        default=1.2, description="candidate/baseline p95 end-to-end latency; above holds"
    )
    max_ttft_p95_ratio: Ratio = Field(
        default=1.2, description="candidate/baseline p95 time to first token; above holds"
    )
    max_itl_p95_ratio: Ratio = Field(default=1.2, description="candidate/baseline p95 inter-token gap; above holds")
    max_kv_usage_p95_ratio: Ratio = Field(
        default=1.25, description="candidate/baseline p95 KV-cache usage; above holds"
    )
    kv_usage_floor: Fraction = Field(
        default=0.5,
        description="candidate p95 KV-cache usage below this is no pressure, whatever the ratio (an idle "
        "baseline reads 0)",
    )
    require: list[EvidenceSignal] = Field(
        default_factory=list, description="signals every matched successful request must carry on both sides"
    )
    default_tolerance: Tolerance = Field(
        default_factory=lambda: Tolerance(), description="when no tolerance rule matches"
    )
    tolerances: list[ToleranceRule] = Field(
        default_factory=list, description="scoped tolerances; the most specific match wins, then the first listed"
    )

    def tolerance_for(self, candidate: Observation) -> tuple[str, Tolerance]:
        """The tolerance that applies to a candidate observation, and its name (``tolerances[i]`` or ``default``)."""
        best: tuple[int, int] | None = None
        for i, rule in enumerate(self.tolerances):
            if rule.matches(candidate) and (best is None or rule.specificity() > best[0]):
                best = (rule.specificity(), i)
        if best is None:
            return "default", self.default_tolerance
        return f"tolerances[{best[1]}]", self.tolerances[best[1]]


class GateInput(BaseModel):
    """The document ``modelfleet gate`` reads."""

    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(default=None, description="free text for the people reading the file; not judged")
    policy: GatePolicy = Field(default_factory=lambda: GatePolicy())
    baseline: list[Observation]
    candidate: list[Observation]


def location(loc: Iterable[int | str]) -> str:
    """``("candidate", 3, "latency_ms")`` as ``candidate[3].latency_ms``."""
    parts: list[str] = []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else ("." if parts else "") + item)
    return "".join(parts) or "<root>"


def _message(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx", {})
    simple = {
        "missing": "is required",
        "extra_forbidden": "is not a known field",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list",
        "literal_error": f"must be one of {ctx.get('expected', '')}",
        "finite_number": "must be a finite number",
        "model_type": "must be an object",
        "dict_type": "must be an object",
        "model_attributes_type": "must be an object",
    }
    if kind in simple:
        return simple[kind]
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be an integer"
    if kind in ("float_type", "float_parsing"):
        return "must be a number"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}"
    if kind in ("string_too_short", "too_short"):
        return "must not be empty"
    return str(err["msg"])


def validation_problems(exc: ValidationError, prefix: tuple[int | str, ...] = ()) -> str:
    """One line per problem, each naming its field path."""
    return "; ".join(f"{location(prefix + tuple(e['loc']))}: {_message(e)}" for e in exc.errors(include_url=False))


def check_observations(side: str, observations: list[Observation]) -> None:
    """Rules across fields and across a side's list, named like the schema errors."""
    seen: dict[str, int] = {}
    for i, obs in enumerate(observations):
        where = f"{side}[{i}]"
        if obs.request_id in seen:
            raise RolloutInputError(
                f"{where}.request_id: duplicate {obs.request_id!r} (also {side}[{seen[obs.request_id]}])"
            )
        seen[obs.request_id] = i
        if obs.output_tokens is not None and obs.output_vector is not None:
            raise RolloutInputError(f"{where}.output_vector: give output_tokens or output_vector, not both")
        if obs.ok:
            if obs.latency_ms is None:
                raise RolloutInputError(f"{where}.latency_ms: is required when ok is true")
            if obs.output_tokens is None and obs.output_vector is None:
                raise RolloutInputError(
                    f"{where}.output_tokens: a successful request needs output_tokens or output_vector"
                )


def parse_policy(doc: Any, prefix: tuple[int | str, ...] = ("policy",)) -> GatePolicy:
    try:
        return GatePolicy.model_validate(doc)
    except ValidationError as exc:
        raise RolloutInputError(validation_problems(exc, prefix)) from None


def parse_gate_input(doc: Any) -> GateInput:
    """Validate a decoded gate document; :class:`RolloutInputError` names the field that is wrong."""
    try:
        gate_input = GateInput.model_validate(doc)
    except ValidationError as exc:
        raise RolloutInputError(validation_problems(exc)) from None
    check_observations("baseline", gate_input.baseline)
    check_observations("candidate", gate_input.candidate)
    return gate_input
