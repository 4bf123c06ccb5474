"""Check that an HTTP request an ESP adapter sends is one the vendor's OpenAPI spec allows.

Adapters are tested against fakes; this keeps the fakes honest by validating every
recorded request against the trimmed vendor specs in tests/specs/ with openapi-core.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from jsonschema.exceptions import ValidationError as SchemaError
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.deserializing.media_types.exceptions import MediaTypeDeserializeError
from openapi_core.templating.media_types.exceptions import MediaTypeNotFound
from openapi_core.validation.request import validators as request_validators
from openapi_core.validation.request.exceptions import (
    MissingParameterError,
    MissingRequiredRequestBody,
    ParameterValidationError,
    RequestBodyValidationError,
    SecurityValidationError,
)
from openapi_core.validation.schemas.exceptions import InvalidSchemaValue
from werkzeug.datastructures import Headers, ImmutableMultiDict

SPEC_DIR = Path(__file__).resolve().parents[1] / "specs"
SPECS = ("klaviyo", "sendgrid")
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_MAX_MESSAGE = 300


@dataclass
class _Request:
    """The openapi-core Request protocol, built from what our fakes record."""

    host_url: str
    path: str
    method: str
    parameters: RequestParameters
    content_type: str
    body: bytes | None


@dataclass(frozen=True)
class _Route:
    template: str
    pattern: re.Pattern[str]
    item: dict[str, Any]


@dataclass(frozen=True)
class _LoadedSpec:
    raw: dict[str, Any]
    host_url: str
    routes: tuple[_Route, ...]
    validators: tuple[Any, Any, Any]


def spec_path(spec: str) -> Path:
    """The committed trimmed spec file for `spec`."""
    if spec not in SPECS:
        raise ValueError(f"unknown spec {spec!r}; expected one of {SPECS}")
    return SPEC_DIR / f"{spec}.json"


@functools.cache
def load_spec(spec: str) -> _LoadedSpec:
    """Parse and validate a trimmed spec once per process; tests check many requests against it."""
    raw = json.loads(spec_path(spec).read_text(encoding="utf-8"))
    api = OpenAPI.from_dict(raw, base_uri=spec_path(spec).as_uri())
    version = "V31" if raw["openapi"].startswith("3.1") else "V30"
    validators = tuple(
        getattr(request_validators, f"{version}Request{kind}Validator")(api.spec) for kind in ("Security", "Parameters", "Body")
    )
    routes = []
    for template, item in raw["paths"].items():
        regex = "".join(
            f"(?P<{part[1:-1]}>[^/]+)" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}/]+\})", template)
        )
        routes.append(_Route(template, re.compile(regex + "$"), item))
    # Literal segments win over templated ones, as OpenAPI path matching requires.
    routes.sort(key=lambda r: r.template.count("{"))
    return _LoadedSpec(raw, raw["servers"][0]["url"].rstrip("/"), tuple(routes), validators)


def _resolve(raw: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = raw
        for part in node["$ref"][2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def _parameters(raw: dict[str, Any], item: dict[str, Any], operation: dict[str, Any]) -> list[dict[str, Any]]:
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for param in [*item.get("parameters", ()), *operation.get("parameters", ())]:
        param = _resolve(raw, param)
        merged[(param["name"], param["in"])] = param
    return list(merged.values())


def _where(error: SchemaError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return path.lstrip(".") or "(root)"


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def _message(error: SchemaError) -> str:
    """jsonschema's message, minus enum lists too long to read and plus why each oneOf branch failed."""
    if error.validator == "enum" and isinstance(error.validator_value, list) and len(error.validator_value) > 10:
        return f"{error.instance!r} is not one of the {len(error.validator_value)} allowed values"
    if error.validator in ("oneOf", "anyOf") and error.context:
        return f"{error.message} ({'; '.join(dict.fromkeys(sub.message for sub in error.context))})"
    return error.message


def _schema_problems(prefix: str, cause: InvalidSchemaValue, with_location: bool) -> list[str]:
    problems = []
    for error in cause.schema_errors:
        if isinstance(error, SchemaError):
            where = f" at {_where(error)}" if with_location else ""
            problems.append(_short(f"{prefix}{where}: {_message(error)}"))
        else:
            problems.append(_short(f"{prefix}: {error}"))
    return problems


def _describe(exc: Exception) -> list[str]:
    """Turn an openapi-core error into short messages naming the offending field."""
    cause = exc.__cause__
    if isinstance(exc, MissingParameterError):
        return []  # required parameters are checked directly, see _missing_parameters
    if isinstance(exc, ParameterValidationError):
        prefix = f"{exc.location} parameter {exc.name!r}"
        if isinstance(cause, InvalidSchemaValue):
            return _schema_problems(prefix, cause, with_location=False)
        return [_short(f"{prefix}: {cause or exc}")]
    if isinstance(exc, SecurityValidationError):
        schemes = " or ".join("+".join(names) for names in getattr(cause, "schemes", ())) or "a security scheme"
        return [f"missing or unusable Authorization header; the spec requires {schemes}"]
    if isinstance(exc, MissingRequiredRequestBody):
        return ["request body is required but none was sent"]
    if isinstance(exc, RequestBodyValidationError):
        if isinstance(cause, InvalidSchemaValue):
            return _schema_problems("request body", cause, with_location=True)
        if isinstance(cause, MediaTypeNotFound):
            return [f"Content-Type {cause.mimetype!r} not accepted; the spec allows {cause.availableMimetypes}"]
        if isinstance(cause, MediaTypeDeserializeError):
            return [f"request body is not valid {cause.mimetype}"]
        return [_short(f"request body: {cause or exc}")]
    return [_short(str(exc))]


def _missing_parameters(params: list[dict[str, Any]], headers: Headers, query: ImmutableMultiDict) -> list[str]:
    """Required parameters must be sent even when the spec gives a default (openapi-core fills it in)."""
    present = {"header": headers, "query": query}
    return [
        f"missing required {p['in']} parameter {p['name']!r}"
        for p in params
        if p.get("required") and p["in"] in present and p["name"] not in present[p["in"]]
    ]


def _unknown_query(params: list[dict[str, Any]], query: ImmutableMultiDict) -> list[str]:
    """The spec does not forbid extra query parameters, but an undeclared one is a typo or a guess."""
    declared = {p["name"]: p for p in params if p["in"] == "query"}
    deep = tuple(f"{name}[" for name, p in declared.items() if p.get("style") == "deepObject")
    unknown = [key for key in dict.fromkeys(query.keys()) if key not in declared and not (deep and key.startswith(deep))]
    return [f"unknown query parameter {key!r}; the spec declares {sorted(declared) or 'none'}" for key in unknown]


def _auth_header(headers: dict[str, str]) -> dict[str, str]:
    """Our fakes record only the scheme word ("Bearer", "Klaviyo-API-Key"); give it a stand-in secret."""
    out = {}
    for name, value in headers.items():
        if name.lower() == "authorization":
            value = value.strip()
            if not value:
                continue
            if " " not in value:
                value = f"{value} redacted"
        out[name] = value
    return out


def check_recorded(spec: str, recorded: dict[str, Any]) -> list[str]:
    """check_request for one entry of a sandbox's ``GET /_sandbox/requests`` (sandboxes.kit)."""
    headers = dict(recorded.get("headers") or {})
    if recorded.get("authorization"):
        headers["Authorization"] = recorded["authorization"]
    return check_request(spec, recorded["method"], recorded["path"], recorded.get("query") or "", headers, recorded.get("body"))


def check_request(spec: str, method: str, path: str, query: str, headers: dict[str, str], body: str | bytes | None) -> list[str]:
    """Return every way this request departs from the vendor spec; an empty list means it conforms.

    `query` is the raw query string (no "?"), `headers` the sent headers (Authorization
    holding just the scheme word is fine), `body` the raw body or None.
    """
    loaded = load_spec(spec)
    method = method.lower()
    if "?" in path:
        path, _, extra = path.partition("?")
        query = f"{query}&{extra}" if query else extra
    label = f"{method.upper()} {path}"

    for route in loaded.routes:
        match = route.pattern.match(path)
        if match:
            break
    else:
        return [f"{label}: unknown path in the {spec} spec ({spec_path(spec).name}; to call a new endpoint add it to tests/specs/trim.py)"]
    operation = route.item.get(method)
    if operation is None:
        allowed = [m.upper() for m in HTTP_METHODS if m in route.item]
        return [f"{label}: method not allowed for {route.template} in the {spec} spec (it has {allowed})"]

    if isinstance(body, str):
        body = body.encode("utf-8")
    header_map = Headers(_auth_header(headers))
    query_map = ImmutableMultiDict(parse_qsl(query.lstrip("?"), keep_blank_values=True))
    content_type = header_map.get("Content-Type", "").strip().lower()
    request = _Request(
        host_url=loaded.host_url,
        path=path,
        method=method,
        parameters=RequestParameters(query=query_map, header=header_map, path=match.groupdict()),
        content_type=content_type,
        body=body or None,
    )

    params = _parameters(loaded.raw, route.item, operation)
    problems = _missing_parameters(params, header_map, query_map) + _unknown_query(params, query_map)
    security, parameters, body_validator = loaded.validators
    for validator in (security, parameters):
        for exc in validator.iter_errors(request):
            problems.extend(_describe(exc))

    if "requestBody" not in operation:
        if body:
            problems.append("this operation takes no request body, but one was sent")
    elif body and not content_type:
        problems.append("request body sent without a Content-Type header")
    else:
        for exc in body_validator.iter_errors(request):
            problems.extend(_describe(exc))
    return [f"{label}: {p}" for p in problems]
