"""RFC 9457 problem details: the one shape of every error of the control API (SPEC §5.1).

``{"type": "urn:sipedge:error:<code>", "title", "status", "detail", "code", "errors": [...]}``
with ``errors`` (a JSON pointer per invalid body field, or the name of a query/path
parameter) on 422. Domain refusals carry their code in their class
(``edge/control/errors.py``); the codes of the HTTP layer itself are in ``PROTOCOL_CODES``.
The OpenAPI document describes every error response with :class:`Problem`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException

from edge.control.errors import ERROR_CODES, DomainError, RateLimited

log = logging.getLogger("sipedge.api")

MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:sipedge:error:"

#: codes of the HTTP layer (the domain's are in edge.control.errors.ERROR_CODES)
PROTOCOL_CODES: dict[str, tuple[int, str]] = {
    "malformed_json": (400, "The body is not valid JSON"),
    "bad_request": (400, "Bad request"),
    "not_found": (404, "Not found"),
    "method_not_allowed": (405, "Method not allowed"),
    "payload_too_large": (413, "The body is too large"),
    "unsupported_media_type": (415, "Unsupported content type"),
    "internal_error": (500, "Internal error"),
}
ALL_CODES: dict[str, tuple[int, str]] = {**ERROR_CODES, **PROTOCOL_CODES}

# a body field whose failure has a code of its own (SPEC §5.1), by JSON pointer
_FIELD_CODES = {"/channels": "channels_out_of_range", "/number": "number_invalid"}
_FIELD_IN_MESSAGE = re.compile(r"field `([^`]+)`")
_json = msgspec.json.Encoder()


class ProblemField(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One invalid input: ``pointer`` (RFC 6901) into the body, or the ``parameter`` (query, path, header)."""

    pointer: str | None = None
    parameter: str | None = None
    detail: str


class Problem(msgspec.Struct, omit_defaults=True, kw_only=True):
    """An RFC 9457 problem (``application/problem+json``)."""

    type: str = msgspec.field(default="about:blank")
    title: str
    status: int
    detail: str
    code: str = msgspec.field(default="bad_request")
    instance: str | None = None
    errors: list[ProblemField] | None = None


def to_pointer(field: str) -> str:
    """``rates[2].rate`` -> ``/rates/2/rate`` (RFC 6901; ``~`` and ``/`` escaped)."""
    parts = re.findall(r"[^.\[\]]+", field)
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts) if parts else ""


def body(status: int, code: str, detail: str, *, errors: list[ProblemField] | None = None,
         instance: str | None = None) -> bytes:
    title = ALL_CODES.get(code, (status, "Error"))[1]
    return _json.encode(Problem(type=TYPE_PREFIX + code, title=title, status=status, detail=detail, code=code,
                                instance=instance, errors=errors))


def problem(status: int, code: str, detail: str, *, errors: list[ProblemField] | None = None,
            headers: dict[str, str] | None = None, instance: str | None = None) -> Response[bytes]:
    return Response(body(status, code, detail, errors=errors, instance=instance), status_code=status,
                    media_type=MEDIA_TYPE, headers=headers)


def _invalid(fields: list[ProblemField], path: str) -> Response[bytes]:
    first = fields[0]
    code = next((_FIELD_CODES[f.pointer] for f in fields if f.pointer in _FIELD_CODES), "validation_failed")
    where = first.pointer or first.parameter or "body"
    return problem(422, code, f"{where}: {first.detail}", errors=fields, instance=path)


# ------------------------------------------------------------------ handlers

def on_validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    if not extra:  # a body that is not JSON at all: a syntax error, not a field error
        return problem(400, "malformed_json", f"request body is not valid JSON: {exc.detail}",
                       instance=request.url.path)
    fields = []
    for e in extra:
        if not isinstance(e, dict):
            continue
        key, message, source = e.get("key"), str(e.get("message", "")), e.get("source")
        match = _FIELD_IN_MESSAGE.search(message)
        if source in ("query", "path", "header", "cookie") and key:
            fields.append(ProblemField(parameter=str(key), detail=message))
        elif match and key in (None, "data", "body"):
            fields.append(ProblemField(pointer=to_pointer(match.group(1)), detail=message))
        else:
            where = str(key or "").removeprefix("$").lstrip(".")
            fields.append(ProblemField(pointer=to_pointer(where) if where not in ("data", "body") else "",
                                       detail=message))
    return _invalid(fields or [ProblemField(pointer="", detail=str(exc.detail))], request.url.path)


def on_msgspec_error(request: Request[Any, Any, Any], exc: msgspec.ValidationError) -> Response[bytes]:
    text, _, where = str(exc).rpartition(" - at `")
    if where:
        field = where.rstrip("`").removeprefix("$").lstrip(".")
    else:
        match = _FIELD_IN_MESSAGE.search(str(exc))
        field = match.group(1) if match else ""
    return _invalid([ProblemField(pointer=to_pointer(field), detail=text or str(exc))], request.url.path)


def on_decode_error(request: Request[Any, Any, Any], exc: msgspec.DecodeError) -> Response[bytes]:
    return problem(400, "malformed_json", f"body is not valid JSON: {exc}", instance=request.url.path)


def on_domain_error(request: Request[Any, Any, Any], exc: DomainError) -> Response[bytes]:
    """Refusals with a code of their own; a full store is 507, a failing one 503 (the store logs
    the start of such an episode once, not per request)."""
    if exc.status == 422:
        field = ProblemField(pointer=to_pointer(exc.field) if exc.field else "", detail=exc.message)
        if exc.field and exc.field[:1].isupper():      # a header (Idempotency-Key, Content-Type)
            field = ProblemField(parameter=exc.field, detail=exc.message)
        elif exc.field and exc.field.startswith("query:"):
            field = ProblemField(parameter=exc.field.removeprefix("query:"), detail=exc.message)
        return problem(422, exc.code, exc.message, errors=[field], instance=request.url.path)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
    return problem(exc.status, exc.code, exc.message, headers=headers, instance=request.url.path)


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """A bug: never a 500 without a log line (with the traceback)."""
    log.error("control API request failed", exc_info=exc,
              extra={"event": "api_error", "method": request.method, "path": request.url.path})
    return problem(500, "internal_error", "internal error (logged)", instance=request.url.path)


def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    if isinstance(exc.__cause__, SerializationException):  # Litestar could not decode the body
        return problem(400, "malformed_json", f"request body is not valid JSON: {exc.detail}",
                       instance=request.url.path)
    status = exc.status_code
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
            401: "unauthorized", 403: "forbidden", 429: "rate_limited"}.get(status, "bad_request")
    if status >= 500:
        return on_unexpected(request, exc)
    detail = str(exc.detail)
    if status == 404 and detail in ("Not Found", ""):
        detail = f"no such resource: {request.url.path}"
    headers = dict(exc.headers or {})
    if status == 405 and "Allow" not in headers:
        from .auth import allowed_methods

        methods = allowed_methods(request.app, request.url.path)
        if methods:
            headers["Allow"] = ", ".join(methods)
    return problem(status, code, detail, headers=headers or None, instance=request.url.path)
