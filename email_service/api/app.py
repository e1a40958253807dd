"""The Connexion application: spec-first routing, validation, auth, limits and error shape."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import msgspec
import yaml
from connexion import FlaskApp
from connexion import context as connexion_context
from connexion.datastructures import MediaTypeDict
from connexion.jsonifier import Jsonifier
from connexion.middleware import MiddlewarePosition
from connexion.options import SwaggerUIOptions
from connexion.validators import VALIDATOR_MAP
from flask import abort, request

from email_service.api import errors
from email_service.api.auth import RUNTIME_SCOPE_KEY, TokenVerifier
from email_service.api.body_limit import BodyLimitMiddleware
from email_service.api.events import EventStreamMiddleware, hub_lifespan
from email_service.api.header_limit import HeaderLimitMiddleware
from email_service.api.paths import TrailingSlashMiddleware
from email_service.api.rate_limit import RateLimitMiddleware, UserRateLimiter, rules_from_spec
from email_service.api.resolver import TagResolver, handler_path
from email_service.api.scope import ScopeValuesMiddleware
from email_service.api.security import SECURITY_MAP
from email_service.api.uri_parsing import OnceURIParser
from email_service.api.validation import (
    HeadAwareJSONResponseBodyValidator,
    SafeJSONRequestBodyValidator,
    SafeMultiPartFormDataValidator,
    SafeParameterValidator,
)
from email_service.api.wsgi import HoldingWSGIMiddleware
from email_service.changes.stream import EventHub
from email_service.db import libpq_url
from email_service.observability.http import ObservabilityMiddleware
from email_service.runtime import Runtime

SPEC_PATH = Path(__file__).resolve().parent.parent / "spec" / "openapi.yaml"
DOCS_PATH = "/docs"
RUNTIME_KEY = "email_service"
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


class _MsgspecJsonifier(Jsonifier):
    """Responses written by msgspec, as UTF-8 bytes that Flask sends as they are.

    Connexion's Flask default indents by 2 (and Flask's sorts keys), which takes the pure-Python
    encoder; even the standard library's compact C encoder took a tenth of the API process's CPU
    on a 50-message page, and msgspec writes the same compact JSON in a fraction of that.
    Connexion's own ``dumps`` returns a str: the bytes would be decoded only to be encoded again
    on the way out, three times the encoding's cost on a page of non-ASCII mail. Reading stays
    the standard library's (request bodies are parsed and validated by Connexion anyway).
    """

    _encoder = msgspec.json.Encoder(decimal_format="number")

    def dumps(self, data: Any, **_kwargs: Any) -> bytes:  # type: ignore[override]
        return self._encoder.encode(data) + b"\n"


COMPACT_JSON = _MsgspecJsonifier(json)


@cache
def load_spec() -> dict[str, Any]:
    with SPEC_PATH.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _allowed_methods_finder(spec: dict[str, Any]) -> Any:
    routes = []
    for path, item in spec["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)) + "$")
        routes.append((pattern, sorted(m.upper() for m in HTTP_METHODS if m in item)))
    # A literal segment is more specific than a parameter: ".../messages/move" before ".../messages/{messageId}".
    routes.sort(key=lambda route: route[0].pattern.count("[^/]+"))

    def allowed(path: str) -> list[str]:
        for pattern, methods in routes:
            if pattern.match(path):
                return methods
        return []

    return allowed


def _operation(spec: dict[str, Any], operation_id: str) -> dict[str, Any]:
    return next(
        op
        for item in spec["paths"].values()
        for op in item.values()
        if isinstance(op, dict) and op.get("operationId") == operation_id
    )


def _require_routed_operation() -> None:
    """404 for a path that can name nothing.

    A request Flask would route but Connexion's router did not (odd bytes in a path) reached
    Flask without its operation context, so its handler cannot run.
    """
    try:
        connexion_context.operation.operation_id  # noqa: B018 - touching it is the check
    except RuntimeError:
        abort(404)
    # PostgreSQL text cannot hold NUL, so no stored id has one: such a path names nothing.
    if any("\x00" in str(value) for value in (request.view_args or {}).values()):
        abort(404)


def _path_patterns(spec: dict[str, Any]) -> dict[str, str]:
    """Path parameters whose schema has a ``pattern``, by name: ids whose shape no literal segment has."""
    found: dict[str, str] = {}
    for item in spec["paths"].values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                if "$ref" in parameter:
                    parameter = spec["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[-1]]
                pattern = parameter.get("schema", {}).get("pattern")
                if parameter.get("in") == "path" and pattern:
                    found[parameter["name"]] = pattern.removeprefix("^").removesuffix("$")
    return found


def _routing_order(spec: dict[str, Any], patterns: dict[str, str]) -> dict[str, Any]:
    """The spec with paths that have a patterned parameter last.

    Connexion's router takes the first template that matches, whatever the parameter's pattern:
    ``/api/webhooks/folders`` matches ``/api/webhooks/{webhookId}`` as a template, but only
    ``/api/{accountId}/folders`` by the spec (``folders`` is no webhook id). Trying the
    unconstrained templates first gives every URL the one operation the spec says it names,
    whatever order paths are written in.
    """

    def constrained(path: str) -> bool:
        return any("{" + name + "}" in path for name in patterns)

    ordered = sorted(spec["paths"].items(), key=lambda item: constrained(item[0]))
    return {**spec, "paths": dict(ordered)}


def _constrain_flask_rules(flask_app: Any, patterns: dict[str, str]) -> None:
    """Give Flask's rules for patterned parameters a converter of that pattern.

    Werkzeug prefers literal segments over parameters, so without it ``/api/webhooks/folders``
    would reach the webhook view while Connexion routed it to the folders operation. Connexion
    adds its rules when the app first starts, so the rule class rewrites them as they come.
    """
    from werkzeug.routing import BaseConverter, Rule

    renamed: dict[str, str] = {}
    for position, (name, regex) in enumerate(sorted(patterns.items())):
        converter_name = f"spec_pattern_{position}"
        flask_app.url_map.converters[converter_name] = type(f"Pattern{position}", (BaseConverter,), {"regex": regex})
        flaskified = name.replace("-", "_")
        renamed[f"<{flaskified}>"] = f"<{converter_name}:{flaskified}>"

    class PatternRule(Rule):
        def __init__(self, string: str, **options: Any) -> None:
            for plain, constrained in renamed.items():
                string = string.replace(plain, constrained)
            super().__init__(string, **options)

    flask_app.url_rule_class = PatternRule


def create_app(runtime: Runtime) -> FlaskApp:
    settings = runtime.settings
    patterns = _path_patterns(load_spec())
    spec = _routing_order(load_spec(), patterns)
    assert settings.database_url is not None, "a Runtime has a resolved DATABASE_URL"
    hub = EventHub(libpq_url(settings.database_url), settings.db_app_role, pool_size=settings.events_db_pool_size)
    app = FlaskApp(
        __name__,
        specification_dir=str(SPEC_PATH.parent),
        validator_map={
            "parameter": SafeParameterValidator,
            "body": MediaTypeDict(
                {
                    **VALIDATOR_MAP["body"],
                    "*/*json": SafeJSONRequestBodyValidator,
                    "multipart/form-data": SafeMultiPartFormDataValidator,
                }
            ),
            "response": MediaTypeDict({**VALIDATOR_MAP["response"], "*/*json": HeadAwareJSONResponseBodyValidator}),
        },
        swagger_ui_options=SwaggerUIOptions(swagger_ui_path=DOCS_PATH),
        lifespan=hub_lifespan(hub),
        jsonifier=COMPACT_JSON,
        uri_parser_class=OnceURIParser,
        security_map=SECURITY_MAP,
    )
    app._middleware_app.asgi_app = HoldingWSGIMiddleware(app.app.wsgi_app)
    # Service errors raised in handlers must reach Connexion's error handlers, not Flask's 500 page.
    app.app.config["PROPAGATE_EXCEPTIONS"] = True
    app.app.extensions[RUNTIME_KEY] = runtime
    app.app.before_request(_require_routed_operation)
    app.add_api(
        spec,
        resolver=TagResolver(),
        pythonic_params=True,
        strict_validation=True,
        validate_responses=settings.validate_responses,
    )
    _constrain_flask_rules(app.app, patterns)
    limiter = None
    if settings.rate_limits_enabled:
        limiter = UserRateLimiter(rules_from_spec(spec, handler_path), settings.redis_url)
    app.add_middleware(
        HeaderLimitMiddleware, position=MiddlewarePosition.BEFORE_SWAGGER, max_bytes=settings.max_header_bytes
    )
    app.add_middleware(
        TrailingSlashMiddleware, position=MiddlewarePosition.BEFORE_SWAGGER, exempt_prefixes=(DOCS_PATH + "/",)
    )
    app.add_middleware(
        ScopeValuesMiddleware,
        position=MiddlewarePosition.BEFORE_EXCEPTION,
        values={RUNTIME_SCOPE_KEY: TokenVerifier.from_settings(settings)},
    )
    app.add_middleware(
        BodyLimitMiddleware,
        position=MiddlewarePosition.BEFORE_SECURITY,
        max_bytes=settings.max_body_bytes,
        per_operation={handler_path(_operation(spec, "uploadAttachment")): settings.max_upload_bytes},
    )
    app.add_middleware(RateLimitMiddleware, position=MiddlewarePosition.BEFORE_VALIDATION, limiter=limiter)
    # Last in the stack, after authentication, the rate limit and validation: the events stream is
    # answered here on the event loop instead of in one of Flask's few request threads.
    app.add_middleware(
        EventStreamMiddleware,
        position=MiddlewarePosition.BEFORE_CONTEXT,
        operation=handler_path(_operation(spec, "streamEvents")),
        hub=hub,
        heartbeat_seconds=settings.events_heartbeat_seconds,
        max_catch_up=settings.events_max_catch_up,
        max_streams_per_user=settings.events_max_streams_per_user,
    )
    app.add_middleware(ObservabilityMiddleware, MiddlewarePosition.BEFORE_EXCEPTION, spec=spec, runtime=runtime)
    errors.install(app, _allowed_methods_finder(spec))
    return app
