"""The affinity keys of a request: its prompt prefix and its session id.

The prefix is text, not tokens: the sidecar has no tokenizer (loading one per
sidecar costs memory and start time, and remote runtimes have none), and equal
text tokenizes to equal tokens, which is what the engine's prefix cache
matches. For chat, each message contributes its role and its text, in order,
as the chat template renders them; for completions, the prompt. The body is
parsed once, only when the policy keys on the prompt; a body that does not
parse gets no key (the engine answers it with a 400 anyway).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from modelfleet.dataplane.sidecar.prefix_table import prefix_digest
from modelfleet.dataplane.sidecar.routing import RequestInfo

SESSION_HEADER = "x-session-id"


def request_info(body: bytes, headers: Mapping[str, str], prefix_chars: int | None) -> RequestInfo:
    """The ``RequestInfo`` of one request; ``prefix_chars`` None skips parsing the body."""
    session = next((v for k, v in headers.items() if k.lower() == SESSION_HEADER), None) or None
    prefix = prompt_prefix(body, prefix_chars) if prefix_chars else None
    return RequestInfo(prefix_key=prefix_digest(prefix) if prefix else None, session_id=session)


def prompt_prefix(body: bytes, chars: int) -> str | None:
    """The first ``chars`` characters of the prompt text, or None when there is none."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    text = _chat_text(doc["messages"], chars) if "messages" in doc else _prompt_text(doc.get("prompt"))
    return text[:chars] or None


def _chat_text(messages: Any, chars: int) -> str:
    if not isinstance(messages, list):
        return ""
    parts: list[str] = []
    size = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        piece = f"{message.get('role', '')}\n{_content_text(message.get('content'))}\n"
        parts.append(piece)
        size += len(piece)
        if size >= chars:  # the rest cannot change the key
            break
    return "".join(parts)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: the text ones count
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return first
        if isinstance(first, int):  # token ids: their decimal spelling keys just as well
            return ",".join(str(t) for t in prompt)
        if isinstance(first, list):
            return ",".join(str(t) for t in first)
    return ""
