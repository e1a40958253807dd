"""Request validation (parameters and JSON bodies) whose messages never echo the input or the schema.

Connexion's default messages quote the offending value ("'hunter22' does not match ...") and
append the whole JSON schema, which would put a password into a response and a log line and
show callers internals. Each message here names the field and the rule it broke, nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from connexion.exceptions import BadRequestProblem, UnsupportedMediaTypeProblem
from connexion.json_schema import Draft4RequestValidator
from connexion.utils import is_null, is_nullable
from connexion.validators import (
    JSONRequestBodyValidator,
    JSONResponseBodyValidator,
    MultiPartFormDataValidator,
    ParameterValidator,
)
from jsonschema import Draft4Validator, ValidationError
from jsonschema.validators import extend
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from email_service.errors import BadRequestError

# No request of the spec nests deeper than a few levels; a deeper body is an attack on the
# parser or the validator (both recurse), refused before either goes that deep.
MAX_JSON_DEPTH = 32
# Names a caller sent are quoted in messages only up to this length.
MAX_QUOTED_NAME = 40
JSON_CONTENT_TYPE = b"application/json"


def _reject_read_only(validator: Any, read_only: bool, instance: Any, schema: dict) -> Any:
    # OpenAPI's readOnly: the property may appear in responses but never in a request.
    if read_only:
        yield ValidationError("is read-only")


@lru_cache(maxsize=256)
def _ecma_regex(pattern: str) -> re.Pattern[str]:
    """The spec's pattern (ECMA 262) as Python reads it: ``$`` ends the input, and nothing after it.

    Python's ``$`` also matches before a final newline, so ``^[^\\u0000-\\u001f]*$`` let
    ``"name\\n"`` through. An unescaped ``$`` outside a character class becomes ``\\Z``.
    """
    out: list[str] = []
    escaped = in_class = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "$":
            char = r"\Z"
        out.append(char)
    return re.compile("".join(out))


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: dict) -> Any:
    if validator.is_type(instance, "string") and not _ecma_regex(pattern).search(instance):
        yield ValidationError("does not match the pattern")


RequestValidator = extend(Draft4RequestValidator, {"readOnly": _reject_read_only, "pattern": _ecma_pattern})
ParameterSchemaValidator = extend(Draft4Validator, {"pattern": _ecma_pattern})


def rule(error: ValidationError) -> str:
    """The rule ``error`` broke, in words that quote the schema's limits but never the value."""
    value = error.validator_value
    messages = {
        "type": f"must be of type {value}",
        "minLength": f"must be at least {value} characters long",
        "maxLength": f"must be at most {value} characters long",
        "pattern": "contains characters or a form that is not allowed",
        "enum": f"must be one of {', '.join(map(str, value))}" if isinstance(value, list) else "is not allowed",
        "format": f"is not a valid {value}",
        "minimum": f"must be at least {value}",
        "maximum": f"must be at most {value}",
        "minItems": f"must have at least {value} items",
        "maxItems": f"must have at most {value} items",
    }
    return messages.get(str(error.validator), "is not valid")


def describe(error: ValidationError) -> str:
    where = ".".join(str(part) for part in error.absolute_path) or "body"
    if error.validator in ("required", "additionalProperties"):
        # These messages name properties, never values.
        return f"{where}: {error.message}"
    return f"{where} {rule(error)}"


def quote_names(names: Iterable[str]) -> str:
    shown = [name if len(name) <= MAX_QUOTED_NAME else name[:MAX_QUOTED_NAME] + "..." for name in sorted(names)]
    return ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")


# Parameter schemas are the spec's own dicts, alive as long as the app: one validator each,
# built on first use, instead of one per parameter per request (most of a check's cost).
_parameter_validators: dict[int, tuple[dict, Any]] = {}
MAX_CACHED_VALIDATORS = 4096


def _parameter_validator(schema: dict) -> Any:
    cached = _parameter_validators.get(id(schema))
    if cached is None or cached[0] is not schema:
        if len(_parameter_validators) > MAX_CACHED_VALIDATORS:
            _parameter_validators.clear()  # a bound, should schemas ever be built per request
        cached = (schema, ParameterSchemaValidator(schema, format_checker=Draft4Validator.FORMAT_CHECKER))
        _parameter_validators[id(schema)] = cached
    return cached[1]


class SafeParameterValidator(ParameterValidator):
    """Query, path and header parameters, with messages like ``query parameter limit must be at least 1``."""

    @staticmethod
    def validate_parameter(parameter_type: str, value: Any, param: dict, param_name: str | None = None) -> str | None:
        if is_nullable(param) and is_null(value):
            return None
        if value is None:
            return f"{parameter_type} parameter {param['name']} is required" if param.get("required") else None
        try:
            _parameter_validator(param.get("schema", param)).validate(value)
        except ValidationError as exc:
            return f"{parameter_type} parameter {param['name']} {rule(exc)}"
        return None

    def validate_request(self, request: Any) -> None:
        if self.strict_validation:
            unknown = self.validate_query_parameter_list(request, security_params=self.security_query_params)
            if unknown:
                raise BadRequestProblem(detail=f"unknown query parameter: {quote_names(unknown)}")
        checks = (
            ("query", self.validate_query_parameter),
            ("path", self.validate_path_parameter),
            ("header", self.validate_header_parameter),
            ("cookie", self.validate_cookie_parameter),
        )
        for location, check in checks:
            for param in self.parameters.get(location, []):
                error = check(param, request)
                if error:
                    raise BadRequestProblem(detail=error)


def _refuse_hostile_values(document: Any) -> None:
    """Refuse what parses but cannot be handled: too deep, or strings that are not Unicode text.

    ``json`` decodes ``"\\ud800"`` into a lone surrogate, which no UTF-8 encoder (PostgreSQL's
    driver, the response writer) accepts later. The walk is iterative, so depth costs no stack.
    """
    pending: list[tuple[Any, int]] = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            _require_text(value)
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise BadRequestProblem(detail=f"Request body nests deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(value, dict):
                for key, item in value.items():
                    _require_text(key)
                    pending.append((item, depth + 1))
            else:
                pending.extend((item, depth + 1) for item in value)


def _require_text(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequestProblem(detail="Request body holds a lone surrogate, which is not Unicode text") from None


class SafeJSONRequestBodyValidator(JSONRequestBodyValidator):
    @property
    def _validator(self) -> Any:
        return RequestValidator(self._schema, format_checker=Draft4Validator.FORMAT_CHECKER)

    async def wrap_receive(self, receive: Receive, *, scope: Scope) -> tuple[Receive, Scope]:
        receive, scope = await super().wrap_receive(receive, scope=scope)
        if "content-type" in Headers(scope=scope):
            return receive, scope
        # Without a Content-Type, Connexion takes the body for the operation's JSON and checks it
        # as such, but the handler's side then reads it as raw bytes (a 500): it is named JSON
        # here, so the handler gets the very document that was checked.
        named = {**scope, "headers": [*scope["headers"], (b"content-type", JSON_CONTENT_TYPE)]}
        return receive, named

    async def _parse(self, stream: Any, scope: Any) -> Any:
        raw = b"".join([chunk async for chunk in stream])
        try:
            text = raw.decode(self._encoding)
        except (UnicodeDecodeError, LookupError):
            raise BadRequestProblem(detail="Request body is not valid UTF-8") from None
        if not text:
            return None
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequestProblem(detail=f"Request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
        except RecursionError:
            raise BadRequestProblem(detail=f"Request body nests deeper than {MAX_JSON_DEPTH} levels") from None
        except ValueError:
            # The standard library refuses integers longer than 4,300 digits (CVE-2020-10735).
            raise BadRequestProblem(detail="Request body holds a number too long to read") from None
        _refuse_hostile_values(document)
        return document

    def _validate(self, body: Any) -> dict | None:
        if body is None:
            # An optional body (syncAccount's) may be left out; a required one may not.
            if self._required and not self._nullable:
                raise BadRequestProblem(detail="Request body must not be empty")
            return None
        try:
            return self._validator.validate(body)
        except ValidationError as exc:
            if exc.validator == "readOnly":
                field = ".".join(str(part) for part in exc.absolute_path)
                raise BadRequestError(f"{field} cannot be changed", code="IMMUTABLE_FIELD") from None
            raise BadRequestProblem(detail=describe(exc)) from None


class SafeMultiPartFormDataValidator(MultiPartFormDataValidator):
    """Multipart forms (uploads), with the same messages as JSON bodies, and nothing logged at error level."""

    async def wrap_receive(self, receive: Receive, *, scope: Scope) -> tuple[Receive, Scope]:
        # Connexion takes a body without a Content-Type for the operation's form, but a form's
        # parts cannot be found without the boundary that header names (the parser fails with a 500).
        if "content-type" not in Headers(scope=scope):
            raise UnsupportedMediaTypeProblem(detail="Request body needs a Content-Type of multipart/form-data")
        return await super().wrap_receive(receive, scope=scope)

    def _validate(self, body: Any) -> dict | None:
        if not isinstance(body, dict):
            raise BadRequestProblem(detail="Request body must be a form")
        if self._strict_validation:
            unknown = set(body) - set(self._schema.get("properties", {}))
            if unknown:
                raise BadRequestProblem(detail=f"unknown form field: {quote_names(unknown)}")
        try:
            self._validator.validate(body)
        except ValidationError as exc:
            raise BadRequestProblem(detail=describe(exc)) from None
        return None


class HeadAwareJSONResponseBodyValidator(JSONResponseBodyValidator):
    """Response validation (``EMAIL_SERVICE_VALIDATE_RESPONSES``) that leaves HEAD answers alone.

    A HEAD answer is the GET answer without its body: checked against the schema, the empty body
    failed it, and every HEAD answered 500 while validation was on.
    """

    def wrap_send(self, send: Send) -> Send:
        if self._scope.get("method") == "HEAD":
            return send
        return super().wrap_send(send)
