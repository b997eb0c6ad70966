"""The OpenAPI 3.1 document of ``GET /api/openapi.json``, generated from the route table.

Paths, methods, path parameters (named as the handler method names them), roles and
summaries come from ``urls.ROUTES`` and the handler classes themselves, so a new route or
method is in the document the moment it exists. What a handler cannot say about itself (its
request and response bodies, its headers) is declared here per handler class, next to the
shared schemas; tests/test_openapi.py checks the declarations against the handlers' field
sets and drives the running server from the document (schemathesis), so neither can drift.

Limits that come from the configuration (name length, largest count, the command types) are
filled in from the running app's config: the document describes this server, not a default.
"""

from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING, Any

import tornado.web
import tornado.websocket

from .. import __version__
from ..sessions import SESSION_COOKIE
from . import api

if TYPE_CHECKING:
    from ..app import QuotaApp

METHODS = ("get", "post", "put", "patch", "delete")
JSON = "application/json"

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "error_id": {
                    "type": "string",
                    "description": "500 and database 503s: names the log line with the details",
                },
            },
        }
    },
}
PERIOD = {
    "type": "object",
    "required": ["limit", "used", "remaining", "resets_at"],
    "properties": {
        "limit": {"type": ["integer", "null"], "description": "null: unlimited"},
        "used": {"type": "integer"},
        "remaining": {"type": ["integer", "null"]},
        "resets_at": {"type": "string", "format": "date-time"},
    },
}
PERIODS = {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Period"}}
DECISION = {
    "type": "object",
    "required": ["allowed", "user", "command_type", "count", "throttle_factor", "periods"],
    "properties": {
        "allowed": {"type": "boolean"},
        "user": {"type": "string"},
        "command_type": {"type": "string"},
        "count": {"type": "integer"},
        "throttle_factor": {"type": "number"},
        "periods": PERIODS,
        "reason": {"enum": ["quota_exceeded", "system_overloaded"]},
        "violation": {
            "type": "object",
            "required": ["period", "limit", "attempted", "message"],
            "properties": {
                "period": {"type": "string"},
                "limit": {"type": "integer"},
                "attempted": {"type": "integer"},
                "message": {"type": "string"},
            },
        },
    },
}
REFUND = {
    "type": "object",
    "required": ["user", "command_type", "key", "count", "refunded_periods", "closed_periods"],
    "properties": {
        "user": {"type": "string"},
        "command_type": {"type": "string"},
        "key": {"type": "string"},
        "count": {"type": "integer"},
        "refunded_periods": {"type": "array", "items": {"type": "string"}},
        "closed_periods": {"type": "array", "items": {"type": "string"}},
        "periods": PERIODS,
    },
}
USER_STATUS = {
    "type": "object",
    "required": ["user", "user_id", "created_at", "throttle_factor", "command_types"],
    "properties": {
        "user": {"type": "string"},
        "user_id": {"type": "integer"},
        "created_at": {"type": "string", "format": "date-time"},
        "throttle_factor": {"type": "number"},
        "command_types": {"type": "object", "additionalProperties": PERIODS},
    },
}
HEALTH = {
    "type": "object",
    "required": ["status", "database"],
    "properties": {
        "status": {"enum": ["ok", "degraded"]},
        "database": {"type": "object", "properties": {"reachable": {"type": "boolean"}}},
    },
}
READY = {
    "type": "object",
    "required": ["status", "checks"],
    "properties": {
        "status": {"enum": ["ready", "not_ready"]},
        "checks": {
            "type": "object",
            "properties": {
                "running": {"type": "boolean"},
                "database": {"type": "boolean"},
                "backplane": {"type": "boolean"},
                "plugins_failing": {"type": "integer"},
            },
        },
    },
}


def _header(description: str, deprecated: bool = False) -> dict[str, Any]:
    header: dict[str, Any] = {"description": description, "schema": {"type": "string"}}
    if deprecated:
        header["deprecated"] = True
    return header


RATE_LIMIT_HEADERS = {
    "RateLimit-Policy": _header(
        'Every limited window: `"daily";q=500;w=86400` (q: limit, w: window seconds).'
    ),
    "RateLimit": _header(
        'The window closest to its limit (the refusing one on 429): `"daily";r=499;t=3600`.'
    ),
    "RateLimit-Limit": _header("Deprecated (drafts up to -06): use RateLimit-Policy.", True),
    "RateLimit-Remaining": _header("Deprecated (drafts up to -06): use RateLimit.", True),
    "RateLimit-Reset": _header("Deprecated (drafts up to -06): use RateLimit.", True),
}
REPLAYED = {"Idempotent-Replayed": _header("`true` when this is the stored answer of a retry.")}
RETRY_AFTER = {"Retry-After": _header("Seconds until the refusing window resets.")}


def _json(schema: dict[str, Any], description: str, headers: dict | None = None) -> dict:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _name(config: Any) -> dict[str, Any]:
    """A user name as clients should send it. The server accepts more (any visible Unicode,
    NFC-normalised): the pattern is the portable subset, docs/api.md has the full rules."""
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": config["quotas.max_username_length"],
        "pattern": "^[A-Za-z0-9_@+-][A-Za-z0-9_.@+-]*$",
        "description": "NFC-normalised; no blank at either end, not '.' or '..' "
        "(see docs/api.md for every rule).",
    }


#: Path parameters whose values the configuration or the name rules constrain.
def _path_schema(name: str, config: Any) -> dict[str, Any] | None:
    if name == "username":
        return _name(config)
    if name == "command_type":
        return {"enum": list(config["quotas.command_types"])}
    if name == "alert_id":
        return {"type": "string", "pattern": "^[1-9][0-9]{0,17}$"}
    return None


def _quota_request(config: Any, fields: set[str], key_field: bool = False) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "user": _name(config),
        "command_type": {"enum": list(config["quotas.command_types"])},
        "count": {"type": "integer", "minimum": 1, "maximum": config["quotas.max_count"]},
        "key": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
    }
    required = ["user", "command_type"] + (["key"] if key_field else [])
    return {
        "type": "object",
        "required": required,
        "additionalProperties": False,
        "properties": {name: properties[name] for name in sorted(fields)},
    }


def _body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": schema}}}


def _declared(config: Any) -> dict[tuple[type, str], dict[str, Any]]:
    """What the handler classes cannot say about themselves, per (class, method)."""
    decision_headers = {**RATE_LIMIT_HEADERS}
    decided = {
        "200": _json(_ref("Decision"), "Admitted.", decision_headers),
        "429": _json(_ref("Decision"), "Over quota.", {**decision_headers, **RETRY_AFTER}),
        "503": _json(
            {"oneOf": [_ref("Decision"), _ref("Error")]},
            "Shedding load (a decision) or the database is unavailable (an error); retry.",
            {"Retry-After": _header("Seconds to wait before retrying.")},
        ),
    }
    consumed = {
        key: {**value, "headers": {**value.get("headers", {}), **REPLAYED}}
        for key, value in decided.items()
    }
    consumed["409"] = _json(_ref("Error"), "The same Idempotency-Key is still being decided.")
    consumed["422"] = _json(_ref("Error"), "The Idempotency-Key was used with another body.")
    request = _quota_request(config, api.REQUEST_FIELDS)
    idempotency = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "A retried consume with the same key and body counts once (per token).",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
    }
    commands = {"enum": list(config["quotas.command_types"])}
    limits = {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {
            period: {"type": ["integer", "null"], "minimum": 0, "maximum": 10**12}
            for period in config["quotas.periods"]
        },
    }
    limits_body = _body(_object({"limits": limits}, ["limits"]))
    created = {"201": _json({"type": "object"}, "Created: the token, shown once.")}
    return {
        **_admin_bodies(config, commands, limits, limits_body, created),
        (api.CheckHandler, "post"): {"requestBody": _body(request), "responses": decided},
        (api.ConsumeHandler, "post"): {
            "parameters": [idempotency],
            "requestBody": _body(request),
            "responses": consumed,
        },
        (api.BatchConsumeHandler, "post"): {
            "requestBody": _body(
                _object(
                    {
                        "decisions": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": api.MAX_BATCH,
                            "items": _quota_request(config, api.BATCH_ITEM_FIELDS),
                        }
                    },
                    ["decisions"],
                )
            ),
            "responses": {
                "200": _json(
                    _object(
                        {"results": {"type": "array", "items": {"type": "object"}}},
                        ["results"],
                    ),
                    "Every item's answer, in order: the single consume's body with its "
                    "status (200, 429, 503), replayed: true for a retried key, or an error.",
                ),
                "400": _json(_ref("Error"), "A bad item (named): nothing was counted."),
            },
        },
        (api.RefundHandler, "post"): {
            "requestBody": _body(_quota_request(config, api.REFUND_FIELDS, key_field=True)),
            "responses": {
                "200": _json(_ref("Refund"), "Given back (or the stored answer).", REPLAYED),
                "404": _json(_ref("Error"), "No consume was counted with that key."),
            },
        },
        (api.UserStatusHandler, "get"): {
            "responses": {
                "200": _json(_ref("UserStatus"), "Per command type and period."),
                "404": _json(_ref("Error"), "A user never seen."),
            }
        },
        (api.HealthHandler, "get"): {
            "responses": {
                "200": _json(_ref("Health"), "Serving."),
                "503": _json(_ref("Health"), "The database is unreachable."),
            }
        },
        (api.LiveHandler, "get"): {
            "responses": {"200": _json(_object({"status": {"const": "ok"}}, ["status"]), "Alive.")}
        },
        (api.ReadyHandler, "get"): {
            "responses": {
                "200": _json(_ref("Ready"), "Ready for traffic (from the last probes)."),
                "503": _json(_ref("Ready"), "Not ready: database, backplane or stopping."),
            }
        },
        (OpenApiHandler, "get"): {
            "responses": {"200": _json({"type": "object"}, "This document.")}
        },
    }


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": required,
        "additionalProperties": False,
        "properties": properties,
    }


def _admin_bodies(
    config: Any, commands: dict, limits: dict, limits_body: dict, created: dict
) -> dict[tuple[type, str], dict[str, Any]]:
    """The request bodies of the admin writes (their answers: docs/admin-api.md)."""
    from ..tokens import ROLES, TOKEN_NAME
    from . import admin, tokens

    rule = {"command_type": commands, "limits": limits, "username": _name(config)}
    return {
        (tokens.TokensHandler, "post"): {
            "requestBody": _body(
                _object(
                    {
                        "name": {"type": "string", "pattern": TOKEN_NAME.pattern},
                        "role": {"enum": list(ROLES)},
                    },
                    sorted(tokens.CREATE_FIELDS),
                )
            ),
            "responses": created,
        },
        (admin.RulesHandler, "post"): {
            "requestBody": _body(_object(rule, ["command_type", "limits"]))
        },
        (admin.RuleHandler, "put"): {"requestBody": limits_body},
        (admin.UserLimitsHandler, "put"): {"requestBody": limits_body},
        (admin.UserResetHandler, "post"): {
            "requestBody": _body(_object({"command_type": commands}, []), required=False)
        },
    }


def _path_parameters(pattern: str, method: Any, config: Any) -> tuple[str, list[dict[str, Any]]]:
    """``/users/([^/]+)`` -> ``/users/{username}`` (the handler method's argument names)."""
    names = [
        name
        for name, p in list(inspect.signature(method).parameters.items())[1:]
        if p.kind is p.POSITIONAL_OR_KEYWORD  # not a WebSocket handler's *args
    ]
    groups = list(re.finditer(r"\(([^()]*)\)", pattern))
    parameters, path, end = [], "", 0
    for name, group in zip(names, groups, strict=True):
        regex = group.group(1)
        schema: dict[str, Any] = {"type": "string", "pattern": f"^{regex}$"}
        if re.fullmatch(r"[a-z_]+(\|[a-z_]+)+", regex):
            schema = {"enum": regex.split("|")}
        schema = _path_schema(name, config) or schema
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
        path += pattern[end : group.start()] + "{" + name + "}"
        end = group.end()
    return path + pattern[end:], parameters


def _kind(handler: type) -> str:
    """The tag of a route: what kind of client it is for."""
    from . import dashboard, session, sse

    if issubclass(handler, tornado.websocket.WebSocketHandler | sse.AdminEventsHandler):
        return "streams"
    if issubclass(handler, dashboard.RootHandler | dashboard.DashboardHandler):
        return "pages"
    if issubclass(handler, session.LoginHandler | session.LogoutHandler):
        return "session"
    name = handler.__module__.rsplit(".", 1)[-1]
    return {"api": "quota", "websocket": "streams"}.get(name, name)


def _default_responses(kind: str, method: str) -> dict[str, Any]:
    if kind == "pages":
        return {
            "200": {"description": "HTML.", "content": {"text/html": {"schema": {}}}},
            "302": {"description": "To the login page (no session)."},
        }
    if kind == "streams":
        return {
            "101": {"description": "WebSocket upgrade."},
            "200": {"description": "Event stream.", "content": {"text/event-stream": {}}},
        }
    if kind == "metrics":
        return {"200": {"description": "Prometheus text.", "content": {"text/plain": {}}}}
    answer = _json({"type": "object"}, "See docs/admin-api.md.")
    return {"200": answer, "201": answer} if method in ("post", "put") else {"200": answer}


def build(app: QuotaApp) -> dict[str, Any]:
    """The document for ``app``'s routes and configuration."""
    from ..urls import DEV_ROUTES, ROUTES  # the route table imports this module

    declared = _declared(app.config)
    paths: dict[str, dict[str, Any]] = {}
    for pattern, handler in ROUTES + (DEV_ROUTES if app.config["dev"] else []):
        kind = _kind(handler)
        for method in METHODS:
            function = getattr(handler, method)
            if function is getattr(tornado.web.RequestHandler, method):
                continue  # not implemented: 405
            path, parameters = _path_parameters(pattern, function, app.config)
            roles = getattr(handler, "method_roles", {}).get(method.upper(), handler.roles)
            doc = inspect.getdoc(handler) or handler.__name__
            operation: dict[str, Any] = {
                "operationId": f"{method}{handler.__name__.removesuffix('Handler')}",
                "summary": doc.split("\n")[0],
                "tags": [kind],
                "x-roles": ["public"] if roles is None else sorted(roles | {"admin"}),
                "security": [] if roles is None else [{"bearer": []}, {"session": []}],
                "responses": _default_responses(kind, method),
            }
            if parameters:
                operation["parameters"] = parameters
            extra = declared.get((handler, method), {})
            operation["parameters"] = operation.get("parameters", []) + extra.get("parameters", [])
            if not operation["parameters"]:
                del operation["parameters"]
            if "requestBody" in extra:
                operation["requestBody"] = extra["requestBody"]
            operation["responses"] = {**operation["responses"], **extra.get("responses", {})}
            operation["responses"]["default"] = _json(_ref("Error"), "The error envelope.")
            paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "quotaserver",
            "version": __version__,
            "description": "Per-user command quotas. Roles: admin may call everything.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Error": ERROR,
                "Period": PERIOD,
                "Decision": DECISION,
                "Refund": REFUND,
                "UserStatus": USER_STATUS,
                "Health": HEALTH,
                "Ready": READY,
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
            },
        },
    }


class OpenApiHandler(api.BaseHandler):
    """GET /api/openapi.json: this API as OpenAPI 3.1 (public: it holds no secret)."""

    roles = None

    def get(self) -> None:
        self.send_json(build(self.app))  # about a millisecond: not worth a cache to keep true
