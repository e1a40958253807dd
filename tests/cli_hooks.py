"""Hooks for the schemathesis CLI run of tests/test_hostile_input.py (SCHEMATHESIS_HOOKS=cli_hooks)."""

from __future__ import annotations

import schemathesis
from contract_hooks import fit_destinations, fit_oauth2
from helpers import TEST_DESTINATIONS


def _fit(context, case) -> None:
    fit_destinations(case.body, context.operation.schema.raw_schema, TEST_DESTINATIONS)
    fit_oauth2(case)


@schemathesis.hook
def map_case(context, case):
    _fit(context, case)
    return case


@schemathesis.hook
def before_add_examples(context, examples):
    # Cases of the examples phase (spec examples completed with generated values) skip map_case.
    for case in examples:
        _fit(context, case)
