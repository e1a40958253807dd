"""operationId -> handler function: ``listAccounts`` of tag Accounts is handlers.accounts.list_accounts."""

from __future__ import annotations

import re

from connexion.resolver import Resolver

HANDLER_PACKAGE = "email_service.handlers"


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def handler_path(operation: dict) -> str:
    """The dotted handler name of an operation object of the spec."""
    return f"{HANDLER_PACKAGE}.{operation['tags'][0].lower()}.{snake_case(operation['operationId'])}"


class TagResolver(Resolver):
    def resolve_operation_id(self, operation: object) -> str:
        return handler_path(operation._operation)  # type: ignore[attr-defined]
