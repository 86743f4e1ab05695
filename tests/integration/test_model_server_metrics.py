"""The engine's /metrics speaks the model-server protocol that Kubernetes inference routers scrape
(vLLM's metric names: the Gateway API Inference Extension's endpoint picker reads these), computed
from the real torch engine's queue and paged KV cache."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.dataplane.manifest import load_manifests
from tests.integration.conftest import MANIFEST, engine_url, get, metric

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"


def test_vllm_protocol_metrics_follow_a_stream(stack):
    engine = engine_url(stack, "smollm2")
    spec = next(d.spec for d in load_manifests(MANIFEST) if d.metadata.name == "smollm2")
    chunks = stack.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from one to fifty in words."}],
        temperature=0,
        max_tokens=64,
        stream=True,
    )
    first = next(iter(chunks))
    assert first.choices
    running = metric(engine, f'vllm:num_requests_running{{model_name="{MODEL}"}}')
    usage = metric(engine, f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}}')
    for _ in chunks:  # finish the stream
        pass
    assert running == 1
    assert 0 < usage <= 1
    assert metric(engine, f'vllm:num_requests_running{{model_name="{MODEL}"}}') == 0
    assert metric(engine, f'vllm:num_requests_waiting{{model_name="{MODEL}"}}') == 0
    assert metric(engine, f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}}') == 0

    status, text = get(engine + "/metrics")
    assert status == 200
    info = next(f for f in text_string_to_metric_families(text) if f.name == "vllm:cache_config_info")
    (sample,) = info.samples
    assert sample.value == 1
    assert sample.labels["num_gpu_blocks"] == str(spec.engine.kv_blocks())
    assert int(sample.labels["block_size"]) == spec.engine.kv_block_size
