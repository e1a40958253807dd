"""Hooks for the schemathesis CLI run of tests/test_hostile_input.py (SCHEMATHESIS_HOOKS=cli_hooks)."""

from __future__ import annotations

import re

import schemathesis
from contract_hooks import fit_destinations
from helpers import TEST_DESTINATIONS


def _fit(context, case) -> None:
    properties = context.operation.schema.raw_schema["components"]["schemas"]["CreateAccountRequest"]["properties"]
    fit_destinations(case.body, re.compile(properties["hostname"]["pattern"]), TEST_DESTINATIONS)


@schemathesis.hook
def map_case(context, case):
    _fit(context, case)
    return case


@schemathesis.hook
def before_add_examples(context, examples):
    # Cases of the examples phase (spec examples completed with generated values) skip map_case.
    for case in examples:
        _fit(context, case)
