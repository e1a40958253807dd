"""One module per tag of the spec; Connexion calls these functions by operationId."""

from __future__ import annotations

import uuid

from connexion import context
from flask import current_app

from email_service.runtime import Runtime
from email_service.tenancy import Principal


def runtime() -> Runtime:
    return current_app.extensions["email_service"]


def principal() -> Principal:
    info = context.context["token_info"]
    return Principal(tenant_id=uuid.UUID(info["tenant_id"]), user_id=uuid.UUID(info["sub"]))
