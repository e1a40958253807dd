"""Request-body validation whose messages never echo the submitted value.

Connexion's default message quotes the offending value ("'hunter22' does not match ..."),
which would put a password into a response and a log line.
"""

from __future__ import annotations

import json
from typing import Any

from connexion.exceptions import BadRequestProblem
from connexion.json_schema import Draft4RequestValidator
from connexion.validators import JSONRequestBodyValidator
from jsonschema import Draft4Validator, ValidationError
from jsonschema.validators import extend

from email_service.errors import BadRequestError


def _reject_read_only(validator: Any, read_only: bool, instance: Any, schema: dict) -> Any:
    # OpenAPI's readOnly: the property may appear in responses but never in a request.
    if read_only:
        yield ValidationError("is read-only")


RequestValidator = extend(Draft4RequestValidator, {"readOnly": _reject_read_only})


def describe(error: ValidationError) -> str:
    where = ".".join(str(part) for part in error.absolute_path) or "body"
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
    if error.validator in ("required", "additionalProperties"):
        # These messages name properties, never values.
        return f"{where}: {error.message}"
    return f"{where} {messages.get(str(error.validator), 'is not valid')}"


class SafeJSONRequestBodyValidator(JSONRequestBodyValidator):
    @property
    def _validator(self) -> Any:
        return RequestValidator(self._schema, format_checker=Draft4Validator.FORMAT_CHECKER)

    async def _parse(self, stream: Any, scope: Any) -> Any:
        raw = b"".join([chunk async for chunk in stream])
        try:
            text = raw.decode(self._encoding)
        except (UnicodeDecodeError, LookupError):
            raise BadRequestProblem(detail="Request body is not valid UTF-8") from None
        if not text:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequestProblem(detail=f"Request body is not valid JSON: {exc.msg} at position {exc.pos}") from None

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
