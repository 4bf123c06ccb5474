"""The receiver's OpenAPI 3.1 document, served at ``/openapi.json`` and kept true by a test."""

from __future__ import annotations

from typing import Any

from adapters.sources.tracking import CALLS

ERROR = {"$ref": "#/components/schemas/Error"}


def _responses(*codes: int, ok: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        if code < 300:
            out[str(code)] = {"description": "accepted", "content": {"application/json": {"schema": ok or {"type": "object"}}}}
        else:
            out[str(code)] = {"description": _REASONS[code], "content": {"application/json": {"schema": ERROR}}}
    return out


_REASONS = {
    400: "malformed or invalid body", 401: "missing or invalid signature, key or timestamp", 404: "unknown source or call",
    413: "body over the size limit", 422: "a topic with no mapping", 503: "the broker did not confirm; retry after Retry-After",
}


def document(sources: list[str]) -> dict[str, Any]:
    """The document for a receiver with ``sources`` configured."""
    source = {"name": "source", "in": "path", "required": True, "schema": {"type": "string", "enum": sources}}
    plain = {"200": {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "mergetag receiver", "version": "1.1.0",
                 "description": "Signed webhooks and a Segment-compatible tracking API. 2xx only after a durable broker confirm."},
        "paths": {
            "/webhooks/{source}": {
                "post": {
                    "summary": "Receive a signed webhook from a configured source",
                    "parameters": [source],
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": {}},
                        "application/x-www-form-urlencoded": {"schema": {"type": "object"}},
                    }},
                    "responses": _responses(200, 202, 400, 401, 404, 413, 422, 503,
                                            ok={"$ref": "#/components/schemas/Accepted"}),
                },
                "get": {"summary": "URL check by senders (also HEAD)", "parameters": [source],
                        "responses": {**plain, **_responses(404)}},
            },
            "/v1/{call}": {
                "post": {
                    "summary": "Segment-compatible tracking API",
                    "parameters": [{"name": "call", "in": "path", "required": True,
                                    "schema": {"type": "string", "enum": [*CALLS, "batch"]}}],
                    "security": [{"writeKey": []}, {}],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "properties": {
                            "writeKey": {"type": "string"}, "userId": {"type": "string"}, "anonymousId": {"type": "string"},
                            "event": {"type": "string"}, "traits": {"type": "object"}, "properties": {"type": "object"},
                            "context": {"type": "object"}, "timestamp": {"type": "string"}, "messageId": {"type": "string"},
                            "batch": {"type": "array", "items": {"type": "object"}}}}}}},
                    "responses": _responses(200, 400, 401, 404, 413, 503, ok={"type": "object", "properties": {"success": {"type": "boolean"}}}),
                },
            },
            "/healthz": {"get": {"summary": "The process is alive", "responses": plain}},
            "/readyz": {"get": {"summary": "The broker connection is up", "responses": {**plain, **_responses(503)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics: deliveries by source, outcome and reason",
                                 "responses": {"200": {"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": plain}},
        },
        "components": {
            "securitySchemes": {"writeKey": {"type": "http", "scheme": "basic", "description": "write key as the username"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "string", "description": "machine-readable reason"},
                    "code": {"type": "string"}, "message": {"type": "string"}, "detail": {"type": "string"}}},
                "Accepted": {"type": "object", "properties": {
                    "status": {"type": "string"}, "message_ids": {"type": "array", "items": {"type": "string"}},
                    "duplicates": {"type": "integer"}}},
            },
        },
    }
