"""Every bad request gets an OpenAI-shaped error with the right status and the field
named, and never disturbs other work (the stack keeps answering)."""

from __future__ import annotations

import httpx
import pytest

pytestmark = [pytest.mark.model]

MODEL = "smollm2-135m-instruct"
OK_MESSAGES = [{"role": "user", "content": "hi"}]

CASES = [
    # (id, path, raw body or json, status, param, code)
    (
        "unknown-model",
        "/v1/chat/completions",
        {"model": "gpt-17", "messages": OK_MESSAGES},
        404,
        "model",
        "model_not_found",
    ),
    (
        "unknown-model-completions",
        "/v1/completions",
        {"model": "gpt-17", "prompt": "x"},
        404,
        "model",
        "model_not_found",
    ),
    ("malformed-json", "/v1/chat/completions", b'{"model": "smollm2", "messages": [', 400, None, "invalid_json"),
    ("body-not-object", "/v1/chat/completions", b"[1, 2, 3]", 400, None, "invalid_json"),
    ("missing-messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages", "missing_required_parameter"),
    ("missing-model", "/v1/chat/completions", {"messages": OK_MESSAGES}, 400, "model", "missing_required_parameter"),
    ("empty-messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "invalid_value"),
    (
        "bad-role",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role",
        "invalid_value",
    ),
    (
        "temperature-too-high",
        "/v1/chat/completions",
        {"model": MODEL, "messages": OK_MESSAGES, "temperature": 3},
        400,
        "temperature",
        "invalid_value",
    ),
    (
        "top-p-zero",
        "/v1/chat/completions",
        {"model": MODEL, "messages": OK_MESSAGES, "top_p": 0},
        400,
        "top_p",
        "invalid_value",
    ),
    (
        "max-tokens-zero",
        "/v1/chat/completions",
        {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 0},
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "max-tokens-string",
        "/v1/chat/completions",
        {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": "many"},
        400,
        "max_tokens",
        "invalid_value",
    ),
    ("n-two", "/v1/chat/completions", {"model": MODEL, "messages": OK_MESSAGES, "n": 2}, 400, "n", "invalid_value"),
    (
        "five-stops",
        "/v1/chat/completions",
        {"model": MODEL, "messages": OK_MESSAGES, "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
        "invalid_value",
    ),
    (
        "unknown-field",
        "/v1/chat/completions",
        {"model": MODEL, "messages": OK_MESSAGES, "temprature": 0.5},
        400,
        "temprature",
        "invalid_value",
    ),
    (
        "prompt-too-long",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 3000}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "completion-prompt-too-long",
        "/v1/completions",
        {"model": MODEL, "prompt": "hello " * 3000},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "max-tokens-over-context",
        "/v1/chat/completions",
        {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 4000},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    ("empty-prompt-list", "/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", "invalid_value"),
    # vLLM's sampling extensions (issue 15): out-of-range values and token ids the model does not have
    *(
        (f"{kind}-{name}", path, {"model": MODEL, **base, **extra}, 400, param, "invalid_value")
        for kind, path, base in (
            ("chat", "/v1/chat/completions", {"messages": OK_MESSAGES}),
            ("text", "/v1/completions", {"prompt": "x"}),
        )
        for name, extra, param in (
            ("top-k-minus-5", {"top_k": -5}, "top_k"),
            ("min-p-over-1", {"min_p": 1.5}, "min_p"),
            ("repetition-penalty-zero", {"repetition_penalty": 0}, "repetition_penalty"),
            ("presence-penalty-3", {"presence_penalty": 3}, "presence_penalty"),
            ("logit-bias-200", {"logit_bias": {"42": 200}}, "logit_bias"),
            ("logit-bias-not-an-id", {"logit_bias": {"hello": 1}}, "logit_bias"),
            ("logit-bias-outside-vocab", {"logit_bias": {"49152": 5}}, "logit_bias"),
            ("min-tokens-over-max-tokens", {"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
            ("stop-token-ids-negative", {"stop_token_ids": [-1]}, "stop_token_ids[0]"),
            ("stop-token-ids-outside-vocab", {"stop_token_ids": [10**6]}, "stop_token_ids"),
        )
    ),
    (
        "min-tokens-over-max-completion-tokens",
        "/v1/chat/completions",
        {"model": MODEL, "messages": OK_MESSAGES, "min_tokens": 10, "max_completion_tokens": 5},
        400,
        "min_tokens",
        "invalid_value",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_openai_error(stack, path, body, status, param, code):
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    resp = httpx.post(stack.base_url + path, timeout=60, **kw)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    assert err["code"] == code
    assert err["message"]
    assert "Traceback" not in err["message"]


def test_unknown_route_is_openai_shaped_404(stack):
    resp = httpx.get(stack.base_url + "/v1/nothing-here", timeout=10)
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found_error"


def test_bad_request_does_not_disturb_a_running_stream(stack):
    good = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": 40,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json=good, timeout=60) as resp:
        lines = resp.iter_lines()
        next(lines)
        bad = httpx.post(
            stack.base_url + "/v1/chat/completions",
            content=b"{oops",
            headers={"content-type": "application/json"},
            timeout=10,
        )
        assert bad.status_code == 400
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in rest[-2]


@pytest.mark.parametrize("value", ["high", "1.5", "5000"])
def test_bad_priority_header_is_a_400_naming_the_header(stack, value):
    resp = httpx.post(
        stack.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 1},
        headers={"x-modelfleet-priority": value},
        timeout=60,
    )
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert (err["param"], err["code"]) == ("x-modelfleet-priority", "invalid_priority")


def test_priority_header_is_accepted(stack):
    resp = httpx.post(
        stack.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 1},
        headers={"x-modelfleet-priority": "7"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
