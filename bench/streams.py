"""One greedy streamed chat request timed from the client's side, shared by the TTFT benchmarks."""

from __future__ import annotations

import time
from typing import Any

import openai


async def stream_ttft(
    client: openai.AsyncOpenAI, model: str, messages: list[dict[str, Any]], tokens: int
) -> tuple[float, float]:
    """Seconds to the first content token and to the end of the stream (``ignore_eos``: exactly ``tokens`` out)."""
    start = time.perf_counter()
    first = None
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    end = time.perf_counter() - start
    return first if first is not None else end, end
