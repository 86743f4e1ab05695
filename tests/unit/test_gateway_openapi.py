"""The gateway's OpenAPI document describes the errors the gateway really sends.

Found by the schemathesis run (tests/integration/test_fuzz_gateway.py): the
document listed FastAPI's 422 ``HTTPValidationError`` for every body route,
while the gateway answers an invalid body with 400 in the OpenAI error shape.
"""

from __future__ import annotations

from modelfleet.dataplane.gateway.openapi import openapi_document
from modelfleet.dataplane.protocol import ApiError

BODY_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank")


def test_body_routes_document_openai_errors_not_fastapi_422():
    doc = openapi_document()
    for path in BODY_ROUTES:
        responses = doc["paths"][path]["post"]["responses"]
        assert "422" not in responses, path
        assert {"200", "400", "404", "429", "503"} <= set(responses), path
        for status in ("400", "404", "429", "503"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema["$ref"] == "#/components/schemas/ErrorResponse", (path, status)
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_error_schema_matches_the_body_the_gateway_sends():
    schemas = openapi_document()["components"]["schemas"]
    detail = schemas["ErrorDetail"]
    sent = ApiError(400, "Missing required parameter: 'model'.", param="model", code="invalid_value").body()
    assert schemas["ErrorResponse"]["required"] == ["error"]
    assert set(detail["properties"]) == set(sent["error"])
    assert set(detail["required"]) == set(sent["error"])  # param and code are present even when null
