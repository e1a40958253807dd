"""Connexion's OpenAPI parameter parsing, without rebuilding the same table for every parameter."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from connexion.uri_parsing import OpenAPIURIParser


class OnceURIParser(OpenAPIURIParser):
    """``param_schemas`` is a property Connexion rebuilds (a dict of every parameter's schema) for
    each parameter and header it resolves: quadratic, and 5-6% of a getMessage's CPU in a profile.
    A parser lives for one request and the operation's parameters do not change, so one build
    per parser is the same table."""

    @cached_property
    def param_schemas(self) -> dict[str, Any]:  # type: ignore[override]
        return {name: definition.get("schema", {}) for name, definition in self.param_defns.items()}
