"""Continuous batching for the runners that generate tokens themselves (the torch runner): the
step scheduler (which sequences prefill or decode this step, chunked prefill, preemption) and the
paged KV cache with its prefix cache. Below the runners in the layers: it imports nothing of
ModelFleet's; vLLM and SGLang keep their own inside their servers."""
