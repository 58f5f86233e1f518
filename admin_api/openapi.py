"""Finishing the OpenAPI 3.1 document Litestar generates from the handlers and msgspec types.

Litestar documents each operation's success answer from its return type; this adds what
the types cannot say: every error response an operation can give (problem+json, with
the codes it may carry), the CSV / JSON Lines content of the CDR exports, examples, and
the problem schema itself. Done once per process (the document is cached).
"""

from __future__ import annotations

import copy
from typing import Any

from edge.control.errors import ERROR_CODES

from .problems import MEDIA_TYPE, PROTOCOL_CODES

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details. `code` is stable: branch on it, not on `title` or `detail`.",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string", "description": "urn:sipedge:error:<code>",
                 "examples": ["urn:sipedge:error:not_found"]},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string", "enum": sorted({**ERROR_CODES, **PROTOCOL_CODES})},
        "instance": {"type": "string", "description": "the request path"},
        "errors": {"type": "array", "description": "422: one entry per invalid input",
                   "items": {"type": "object", "required": ["detail"], "properties": {
                       "pointer": {"type": "string", "description": "RFC 6901 pointer into the body"},
                       "parameter": {"type": "string", "description": "a query, path or header parameter"},
                       "detail": {"type": "string"}}}},
    },
}

DESCRIPTIONS = {
    "400": "malformed_json: the body is not JSON", "401": "unauthorized: missing, unknown or revoked key",
    "403": "forbidden: the key's scope does not allow this", "404": "not_found / call_not_found",
    "405": "method_not_allowed", "409": "a conflict with stored state (see `code`)",
    "413": "payload_too_large", "415": "unsupported_media_type",
    "422": "validation_failed or a field's own code (channels_out_of_range, number_invalid, password_too_weak)",
    "429": "rate_limited (see Retry-After)", "500": "internal_error (logged)",
    "503": "store_unavailable: nothing was written", "507": "store_full: nothing was written",
}

EXAMPLES: dict[str, dict[str, Any]] = {
    "createAccount": {"name": "Acme", "admin": "acme.admin"},
    "topUpAccount": {"amount": "100.00"},
    "setAdminPassword": {"password": "correct horse battery staple"},
    "createProfile": {"name": "HQ", "channels": 10, "auth": "digest"},
    "updateProfile": {"channels": 20},
    "allocateProfileCredit": {"amount": "5.00"},
    "setAutoRecharge": {"enabled": True, "amount": "10.00", "min_balance": "2.00"},
    "setBundles": {"us_bundles": 2},
    "buyNumber": {"number": "+14155550100"},
    "attachNumber": {"number": "+14155550100", "extension": "sales"},
    "createBusinessAccount": {"name": "acme.sales"},
    "attachBusinessAccount": {"name": "acme.sales"},
    "replaceRates": {"rates": [{"prefix": "44", "rate": "0.0200", "connect_fee": "0", "min_seconds": 60,
                                "increment_seconds": 6, "description": "UK"}]},
    "replaceBundleExclusions": {"prefixes": ["1218632"]},
    "createApiKey": {"scope": "account", "account_id": "acc_1f0c9a0b1c2d3e4f", "read_only": True,
                     "name": "portal"},
    "createWebhook": {"url": "https://provisioning.example.com/sipedge", "events": ["call.ended", "credit.low"]},
    "hangupCall": {"cause": 487},
}


#: OpenAPI links (3.1 §4.8.20): what an answer's ids open, for clients and for schemathesis's stateful
#: phase (tests/api/test_schemathesis.py), which follows them from a create to its reads, changes and deletes
_ACCOUNT = {"account_id": "$response.body#/id"}
_PROFILE = {"profile_id": "$response.body#/id"}
LINKS: dict[str, tuple[str, dict[str, tuple[str, dict[str, str]]]]] = {
    "createAccount": ("201", {
        "GetAccount": ("getAccount", _ACCOUNT), "TopUpAccount": ("topUpAccount", _ACCOUNT),
        "CreateProfile": ("createProfile", _ACCOUNT), "ListAccountProfiles": ("listAccountProfiles", _ACCOUNT),
        "BuyNumber": ("buyNumber", _ACCOUNT), "CreateWebhook": ("createWebhook", _ACCOUNT),
        "ListAccountCdrs": ("listAccountCdrs", _ACCOUNT), "DeleteAccount": ("deleteAccount", _ACCOUNT)}),
    "createProfile": ("201", {
        "GetProfile": ("getProfile", _PROFILE), "UpdateProfile": ("updateProfile", _PROFILE),
        "AllocateProfileCredit": ("allocateProfileCredit", _PROFILE),
        "GetProfileCredentials": ("getProfileCredentials", _PROFILE),
        "RotateProfileCredentials": ("rotateProfileCredentials", _PROFILE),
        "SetAutoRecharge": ("setAutoRecharge", _PROFILE), "SetBundles": ("setBundles", _PROFILE),
        "ListProfileCdrs": ("listProfileCdrs", _PROFILE), "ListProfileLedger": ("listProfileLedger", _PROFILE),
        "DeleteProfile": ("deleteProfile", _PROFILE)}),
    "buyNumber": ("201", {
        "ReleaseNumber": ("releaseNumber", {"account_id": "$response.body#/account_id",
                                            "number": "$response.body#/number"})}),
    "createApiKey": ("201", {"RevokeApiKey": ("revokeApiKey", {"key_id": "$response.body#/id"})}),
    "createWebhook": ("201", {
        "ListDeliveries": ("listDeliveries", {"account_id": "$response.body#/account_id",
                                              "webhook_id": "$response.body#/id"}),
        "DeleteWebhook": ("deleteWebhook", {"account_id": "$response.body#/account_id",
                                            "webhook_id": "$response.body#/id"})}),
}


def _errors_for(method: str, path: str, op: dict[str, Any]) -> list[str]:
    if op.get("operationId") == "health":
        return ["500"]
    codes = ["401", "403", "404", "429", "500"]
    if op.get("requestBody") or op.get("parameters") or op.get("operationId") == "replaceRates":
        codes += ["400", "422"]
    if method in ("post", "put", "patch", "delete"):
        codes += ["409", "503", "507"]
    if op.get("requestBody") or op.get("operationId") == "replaceRates":
        codes += ["413", "415"]
    return codes


def finish(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["openapi"] = "3.1.0"
    info = doc.setdefault("info", {})
    info["description"] = ("The sipedge control API (SPEC §5). Money is a decimal string, timestamps are RFC 3339, "
                           "errors are RFC 9457 problems with a stable `code`. Authenticate with "
                           "`Authorization: Bearer <key>`. See docs/api.md.")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    import msgspec

    from .schemas import RatesPut

    _, extra = msgspec.json.schema_components([RatesPut], ref_template="#/components/schemas/{name}")
    for name, schema in extra.items():
        schemas.setdefault(name, schema)
    ref = {"$ref": "#/components/schemas/Problem"}
    from . import schemas as bodies

    for name, schema in schemas.items():   # request bodies refuse unknown fields (a typo is a 422)
        cls = getattr(bodies, name, None)
        if isinstance(cls, type) and issubclass(cls, bodies.Body) and schema.get("type") == "object":
            schema["additionalProperties"] = False
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            responses = op.setdefault("responses", {})
            for status in list(responses):
                if status.startswith(("4", "5")):     # Litestar's own ValidationException schema: replace
                    del responses[status]
            for status in _errors_for(method, path, op):
                responses[status] = {"description": DESCRIPTIONS[status], "content": {MEDIA_TYPE: {"schema": ref}}}
                if status == "429":
                    responses[status]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
            op_id = op.get("operationId", "")
            if op_id in LINKS:
                status, links = LINKS[op_id]
                responses.setdefault(status, {"description": "created"})["links"] = {
                    name: {"operationId": target, "parameters": params} for name, (target, params) in links.items()}
            if op_id == "health":
                op["security"] = []
            if op_id in ("listProfileCdrs", "listAccountCdrs"):
                ok = responses.get("200", {}).setdefault("content", {})
                ok["text/csv"] = {"schema": {"type": "string"},
                                  "example": "seq,call_id,account_id,profile_id,...\n"}
                ok["application/x-ndjson"] = {"schema": {"type": "string"}}
            if op_id == "replaceRates":
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/RatesPut"},
                                         "example": EXAMPLES[op_id]},
                    "text/csv": {"schema": {"type": "string"},
                                 "example": "prefix,rate,connect_fee,min_seconds,increment_seconds,description\n"
                                            "44,0.0200,0,60,6,UK\n"}}}
            elif op_id in EXAMPLES and "requestBody" in op:
                for media in op["requestBody"].get("content", {}).values():
                    media["example"] = EXAMPLES[op_id]
    return doc
