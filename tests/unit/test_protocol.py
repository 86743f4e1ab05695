"""OpenAI request validation names the failing field the way OpenAI does."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from modelfleet.dataplane.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_json_body,
    validation_error,
)


def _error(model, body) -> ApiError:
    with pytest.raises(ValidationError) as exc:
        model.model_validate(body)
    return validation_error(exc.value.errors(include_url=False))


def test_nested_field_path():
    err = _error(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "x"}]})
    assert err.param == "messages[1].role"
    assert err.status == 400


def test_unknown_argument():
    err = _error(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "bogus": 1})
    assert err.param == "bogus"
    assert err.message.startswith("Unrecognized request argument")


def test_union_branch_names_do_not_leak_into_param():
    err = _error(CompletionRequest, {"model": "m", "prompt": 5})
    assert err.param == "prompt"


def test_stop_list_and_defaults():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "stop": "x",
        }
    )
    assert req.stop_list() == ("x",)
    assert req.messages[0].text() == "ab"
    assert req.token_limit() is None
    assert CompletionRequest.model_validate({"model": "m", "prompt": "p"}).token_limit() == 16


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"\xff\xfe"])
def test_bad_bodies(raw):
    with pytest.raises(ApiError) as err:
        parse_json_body(raw)
    assert err.value.status == 400 and err.value.code == "invalid_json"


def test_priority_header_parses_integers_in_range_only() -> None:
    from modelfleet.dataplane.protocol import ApiError, parse_priority

    assert parse_priority(None) == 0
    assert parse_priority(" ") == 0
    assert parse_priority("-3") == -3
    assert parse_priority("1000") == 1000
    for bad in ("1001", "x", "2.0"):
        with pytest.raises(ApiError) as err:
            parse_priority(bad)
        assert err.value.status == 400 and err.value.param == "x-modelfleet-priority"
