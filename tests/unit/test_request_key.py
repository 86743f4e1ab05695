"""The affinity keys the coordinator reads from a request."""

from __future__ import annotations

import json

from modelfleet.dataplane.sidecar.prefix_table import prefix_digest
from modelfleet.dataplane.sidecar.request_key import prompt_prefix, request_info


def chat(*contents: str) -> bytes:
    roles = ["system", "user", "assistant"]
    return json.dumps(
        {"model": "m", "messages": [{"role": roles[i % 3], "content": c} for i, c in enumerate(contents)]}
    ).encode()


def test_chat_prefix_is_roles_and_contents_in_order_cut_at_the_limit():
    assert prompt_prefix(chat("Be brief.", "Hi"), 1000) == "system\nBe brief.\nuser\nHi\n"
    assert prompt_prefix(chat("Be brief.", "Hi"), 8) == "system\nB"
    # a later turn of the same conversation keeps the key once the prefix is long enough
    long_system = "x" * 300
    assert prompt_prefix(chat(long_system, "a"), 256) == prompt_prefix(chat(long_system, "a", "b", "c"), 256)


def test_content_parts_and_completion_prompts():
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url"}]}]}
    assert prompt_prefix(json.dumps(parts).encode(), 100) == "user\nlook\n"
    assert prompt_prefix(b'{"prompt": "Once upon a time"}', 4) == "Once"
    assert prompt_prefix(b'{"prompt": ["first", "second"]}', 100) == "first"
    assert prompt_prefix(b'{"prompt": [1, 2, 3]}', 100) == "1,2,3"


def test_no_prompt_no_key():
    for body in (b"not json", b"[]", b"{}", b'{"prompt": ""}', b'{"messages": 3}', b"\xff"):
        assert prompt_prefix(body, 100) is None


def test_request_info_reads_the_session_header_and_skips_parsing_when_not_asked():
    info = request_info(chat("s", "u"), {"x-session-id": "abc"}, 256)
    assert info.session_id == "abc"
    assert info.prefix_key == prefix_digest("system\ns\nuser\nu\n")
    assert request_info(chat("s", "u"), {"X-Session-Id": "abc"}, None).prefix_key is None
    assert request_info(chat("s", "u"), {}, None).session_id is None
