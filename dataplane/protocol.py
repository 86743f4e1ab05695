"""OpenAI wire models shared by the gateway and the engine, and the error shape.

Requests for deployments whose runtime ModelFleet implements the API for (the
torch runner) are validated strictly: an unknown or out-of-range field is a
400 that names the field, as the OpenAI API does. Requests for an
OpenAI-compatible backend (vLLM, SGLang, remote) are ``ForwardedRequest``s:
only what ModelFleet reads is checked, and the backend judges the rest
(docs/openai-api.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# ---- errors ---------------------------------------------------------------


class ApiError(Exception):
    """An error a client sees, in the OpenAI shape, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


PRIORITY_HEADER = "x-modelfleet-priority"


def parse_priority(value: str | None) -> int:
    """The request's scheduling priority from its header (higher first; default 0)."""
    if value is None or not value.strip():
        return 0
    try:
        priority = int(value)
    except ValueError:
        priority = None
    if priority is None or not -1000 <= priority <= 1000:
        raise ApiError(
            400,
            f"Header {PRIORITY_HEADER} must be an integer from -1000 to 1000, got {value[:40]!r}.",
            param=PRIORITY_HEADER,
            code="invalid_priority",
        )
    return priority


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")


def overloaded(retry_after_s: int, what: str) -> ApiError:
    return ApiError(
        429,
        f"{what} is at capacity; retry after {retry_after_s} s.",
        type="rate_limit_error",
        code="overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )


def unavailable(retry_after_s: int, message: str) -> ApiError:
    return ApiError(
        503, message, type="service_unavailable", code="no_ready_replica", headers={"Retry-After": str(retry_after_s)}
    )


def internal_error(message: str = "The server had an error while processing your request.") -> ApiError:
    return ApiError(500, message, type="server_error", code="internal_error")


def field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as the OpenAI `param`: ('messages', 0, 'role') -> messages[0].role."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        else:
            out += ("." if out else "") + item
    return out


def validation_error(errors: Sequence[Mapping[str, Any]], skip_prefix: int = 0) -> ApiError:
    """The first validation failure (pydantic's or FastAPI's error dicts) as a 400 naming the field."""
    if not errors:
        return ApiError(400, "The request is invalid.", code="invalid_value")
    err = errors[0]
    loc = tuple(err.get("loc", ()))[skip_prefix:]
    # drop pydantic's union-branch tags such as 'str' or 'list[str]' from the path
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS)))
    param = field_path(loc) or None
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        msg = "Unrecognized request argument supplied"
    elif kind == "missing":
        msg = "Missing required parameter"
    code = "missing_required_parameter" if kind == "missing" else "invalid_value"
    return ApiError(400, f"{msg}: '{param}'." if param else msg, param=param, code=code)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "function-after"})


def parse_json_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise ApiError(400, "The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(
            400,
            f"The request body is not valid JSON: {exc.__class__.__name__} at position {getattr(exc, 'pos', 0)}.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


# ---- requests -------------------------------------------------------------


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(WireModel):
    include_usage: bool = False


StopField = Annotated[str | list[str] | None, Field(description="Up to 4 sequences where generation stops.")]


class SamplingFields(WireModel):
    """Fields shared by chat and text completions."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    n: Annotated[int, Field(ge=1, le=1, description="Only n=1 is supported.")] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: Annotated[int | None, Field(ge=-(2**63), lt=2**64)] = None
    presence_penalty: Annotated[
        float | None,
        Field(ge=-2.0, le=2.0, description="Subtracted once from the logit of every token already generated."),
    ] = None
    frequency_penalty: Annotated[
        float | None,
        Field(ge=-2.0, le=2.0, description="Subtracted from a token's logit once per time it was generated."),
    ] = None
    logit_bias: Annotated[
        dict[str, float] | None,
        Field(description="Token id (as a string) -> a bias from -100 to 100 added to its logit before sampling."),
    ] = None
    top_k: Annotated[
        int | None,
        Field(ge=-1, description="vLLM extension: sample among the k most likely tokens; 0 or -1 considers all."),
    ] = None
    min_p: Annotated[
        float | None,
        Field(
            ge=0.0,
            le=1.0,
            description="vLLM extension: drop tokens less likely than min_p times the most likely token.",
        ),
    ] = None
    repetition_penalty: Annotated[
        float | None,
        Field(
            gt=0.0,
            allow_inf_nan=False,
            description="vLLM extension: a token of the prompt or the output has its logit divided by this "
            "value when positive, multiplied when negative (1: off).",
        ),
    ] = None
    stop_token_ids: Annotated[
        list[Annotated[int, Field(ge=0)]] | None,
        Field(description="vLLM extension: token ids that end the completion (their text is not returned)."),
    ] = None
    user: Annotated[str | None, Field(max_length=256)] = None
    ignore_eos: Annotated[
        bool, Field(description="vLLM-compatible extension: keep generating past end-of-sequence (benchmarks).")
    ] = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {key[:20]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be from -100 to 100, got {bias} for token {key}")
        return v

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """(token id, bias) pairs; of keys naming the same id ("7", "07") the last one holds."""
        return tuple({int(k): float(b) for k, b in (self.logit_bias or {}).items()}.items())

    def token_ids_named(self) -> list[tuple[str, int]]:
        """The token ids the request names (``logit_bias`` keys, ``stop_token_ids``) with their field."""
        named = [("logit_bias", t) for t, _ in self.logit_bias_pairs()]
        return named + [("stop_token_ids", t) for t in self.stop_token_ids or ()]

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def streams(self) -> bool:
        return self.stream

    def wants_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


MinTokensField = Annotated[
    int,
    Field(
        ge=0,
        description="vLLM extension: end-of-sequence and stop_token_ids cannot end the completion, and stop "
        "strings are not looked for, before this many tokens.",
    ),
]


def _within_limit(min_tokens: int, limit: int | None) -> int:
    if limit is not None and min_tokens > limit:
        raise ValueError(f"min_tokens ({min_tokens}) must not exceed the completion limit ({limit})")
    return min_tokens


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    min_tokens: MinTokensField = 0  # after the limits: its check reads them
    logprobs: Literal[False] | None = None

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens(cls, v: int, info: ValidationInfo) -> int:
        limit = info.data.get("max_completion_tokens") or info.data.get("max_tokens")
        return _within_limit(v, limit)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: Annotated[
        str | list[int] | list[str], Field(description="A string, a single-element list of strings, or token ids.")
    ]
    max_tokens: Annotated[int | None, Field(ge=1)] = 16
    min_tokens: MinTokensField = 0  # after max_tokens: its check reads it
    echo: Literal[False] | None = None
    logprobs: None = None

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens(cls, v: int, info: ValidationInfo) -> int:
        return _within_limit(v, info.data.get("max_tokens"))

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], str) and len(v) != 1:
                raise ValueError("only one prompt per request is supported")
        return v

    def token_limit(self) -> int | None:
        return self.max_tokens


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request


class EmbeddingRequest(WireModel):
    """``POST /v1/embeddings`` (OpenAI's shape)."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Annotated[
        str | list[str] | list[int] | list[list[int]],
        Field(
            description="A string, a list of strings, or token ids of the model's own vocabulary (one list, or a "
            f"list of lists), used as given: no special tokens are added. At most {MAX_EMBEDDING_INPUTS} inputs."
        ),
    ]
    encoding_format: Annotated[
        Literal["float", "base64"],
        Field(description="float: JSON numbers; base64: the vector's little-endian float32 bytes, base64-encoded."),
    ] = "float"
    dimensions: Annotated[
        int | None,
        Field(ge=1, description="Output dimensions; only the model's own size is accepted (no shortened vectors)."),
    ] = None
    user: Annotated[str | None, Field(max_length=256)] = None

    @field_validator("input")
    @classmethod
    def _some_input(cls, v: str | list[str] | list[int] | list[list[int]]) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("input must not be an empty list")
            if len(v) > MAX_EMBEDDING_INPUTS:
                raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        return v

    def inputs(self) -> tuple[list[str], list[list[int]]]:
        """The inputs as texts or as token-id lists (exactly one of the two is non-empty)."""
        v = self.input
        if isinstance(v, str):
            return [v], []
        if isinstance(v[0], str):
            return [str(s) for s in v], []
        if isinstance(v[0], int):
            return [], [[int(t) for t in v]]
        return [], [[int(t) for t in ids] for ids in v]

    def input_param(self, index: int) -> str:
        """The OpenAI ``param`` naming one input: ``input`` for a single one, else ``input[i]``."""
        v = self.input
        single = isinstance(v, str) or (isinstance(v, list) and bool(v) and isinstance(v[0], int))
        return "input" if single else f"input[{index}]"


class RerankRequest(WireModel):
    """``POST /v1/rerank``: the Cohere/Jina shape that vLLM and SGLang serve."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    query: Annotated[str, Field(min_length=1, description="The text the documents are ranked against.")]
    documents: Annotated[
        list[Annotated[str, Field(min_length=1)]],
        Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS, description="The texts to rank."),
    ]
    top_n: Annotated[
        int | None, Field(ge=0, description="Return only the best n results; absent or 0 returns all (as vLLM).")
    ] = None
    return_documents: Annotated[bool, Field(description="Include each document's text in its result.")] = True
    user: Annotated[str | None, Field(max_length=256)] = None


# ---- requests for OpenAI-compatible backends --------------------------------------------------


class ForwardedRequest(BaseModel):
    """A request for a deployment whose runtime is an OpenAI-compatible backend (vLLM, SGLang, remote).

    The backend implements the API and judges the request, so only what ModelFleet itself reads is
    checked here (``model``, for routing); every other field is kept as sent, known to ModelFleet or not
    (docs/openai-api.md). The body forwarded is always the client's own bytes, not this model.
    """

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=256)]

    def token_limit(self) -> int | None:
        return None


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class ForwardedGeneration(ForwardedRequest):
    """A chat or text completion for an OpenAI-compatible backend. ``stream``, ``stream_options`` and the
    completion limits are read (usage in streams; per-key token limits), never refused: a value of the wrong
    type is the backend's to refuse."""

    stream: Any = None
    stream_options: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    n: Any = None

    @property
    def streams(self) -> bool:
        return self.stream is True

    def wants_usage_in_stream(self) -> bool:
        options = self.stream_options
        return self.streams and isinstance(options, dict) and options.get("include_usage") is True

    def token_limit(self) -> int | None:
        """n x the completion limit (``max_completion_tokens``, else ``max_tokens``); None when unset."""
        limit = _positive_int(self.max_completion_tokens) or _positive_int(self.max_tokens)
        return None if limit is None else limit * (_positive_int(self.n) or 1)
