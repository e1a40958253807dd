"""Property-based contract tests: every operation, positive and negative data, all checks."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import hypothesis
import pytest
import schemathesis
from contract_hooks import OAUTH2_ENV, fit_destinations, fit_oauth2
from helpers import User
from hypothesis import HealthCheck
from schemathesis.config import SchemathesisConfig

from email_service.api.app import create_app
from email_service.oauth2.providers import allowed_return_urls, load_providers
from email_service.runtime import Runtime

CONFIG = SchemathesisConfig.from_dict(
    {
        "generation": {"mode": "all", "max-examples": 60},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
        "checks": {"enabled": True},
    }
)
ACCOUNT_OPERATIONS = ["listAccounts", "createAccount", "getAccount", "updateAccount", "deleteAccount"]
FUZZ_SETTINGS = hypothesis.settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=60)


@pytest.fixture(scope="module")
def fuzz_runtime(backing):
    # Limits are tested on their own; here they would turn most generated requests into 429s.
    runtime = Runtime.build(
        replace(
            backing,
            rate_limits_enabled=False,
            oauth2_providers=load_providers(OAUTH2_ENV),
            oauth2_return_urls=allowed_return_urls(OAUTH2_ENV),
        )
    )
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def api_schema(fuzz_runtime):
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(fuzz_runtime), config=CONFIG)
    policy = fuzz_runtime.settings.destinations

    @schema.hook
    def map_case(context, case):
        fit_destinations(case.body, schema.raw_schema, policy)
        fit_oauth2(case)
        return case

    @schema.hook
    def before_add_examples(context, examples):
        # Cases of the examples phase (spec examples completed with generated values) skip map_case.
        for case in examples:
            fit_destinations(case.body, schema.raw_schema, policy)
            fit_oauth2(case)

    return schema


@pytest.fixture(scope="module")
def fuzz_user(verifier) -> User:
    return User(verifier)


# GET /api/events answers 200 with a stream that never ends: a generated request with valid
# credentials would open one and wait on it for ever. Its error answers are checked against the
# contract below instead; the stream itself is tested through a real server in test_events_stream.
schema = schemathesis.pytest.from_fixture("api_schema").exclude(operation_id="streamEvents")


@schema.parametrize()
@FUZZ_SETTINGS
def test_every_operation_honours_the_contract(case, fuzz_user):
    case.call_and_validate(headers=fuzz_user.headers)


def test_sequences_of_calls_follow_the_links_and_reach_real_resources(api_schema, verifier):
    """Create, read, update, delete in generated orders; each operation must succeed at least once."""
    statuses: dict[str, set[int]] = defaultdict(set)
    # The links the spec declares start at createAccount, so journeys run over the account operations.
    base = api_schema.include(operation_id=ACCOUNT_OPERATIONS).as_state_machine()

    class Journeys(base):
        def setup(self):
            # A new tenant per generated journey: what one journey created cannot change the next.
            self.user = User(verifier)

        def get_call_kwargs(self, case):
            return {"headers": self.user.headers}

        def after_call(self, response, case):
            statuses[case.operation.definition.raw["operationId"]].add(response.status_code)

    Journeys.run(settings=hypothesis.settings(FUZZ_SETTINGS, max_examples=40, stateful_step_count=8))
    for operation in ACCOUNT_OPERATIONS:
        assert any(200 <= s < 300 for s in statuses[operation]), (operation, statuses[operation])


def test_the_events_streams_error_answers_honour_the_contract(api_schema, fuzz_user):
    operation = api_schema["/api/events"]["GET"]
    unauthenticated = operation.Case(query={}).call_and_validate()
    assert unauthenticated.status_code == 401
    unknown = operation.Case(query={"accountId": "no-such-account"}).call_and_validate(headers=fuzz_user.headers)
    assert unknown.status_code == 404
    # An id the service never issued opens the stream from now (with a resync event), as a
    # browser's EventSource needs when it reconnects; the answer still honours the contract.
    bad_position = operation.Case(query={}, headers={"Last-Event-ID": "not-an-event-id"})
    assert bad_position.call_and_validate(headers=fuzz_user.headers).status_code == 200
    unknown_parameter = operation.Case(query={"since": "1"}).call_and_validate(headers=fuzz_user.headers)
    assert unknown_parameter.status_code == 400
