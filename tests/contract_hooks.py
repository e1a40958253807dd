"""What the contract tests change in generated requests, shared by the pytest run and the CLI run.

Host names such as "0", "3" or "localhost" and URLs such as "http://0" fit the spec's patterns,
but the destination policy refuses them with 400 DESTINATION_NOT_ALLOWED by design
(tests/test_destinations.py and tests/test_webhooks.py cover that). Such a value becomes a
public-looking one, so that any other 400 on valid data still fails the contract tests.
"""

from __future__ import annotations

import re
from typing import Any

from email_service.protocols.destinations import DestinationPolicy, DestinationRefused, check
from email_service.webhooks import urls as webhook_urls

HOST_FIELDS = (("hostname", "port"), ("smtpHostname", "smtpPort"))
# An address, not a name: creating an endpoint then needs no DNS answer, which can be slow here.
# Public, so the policy lets it through; nothing is ever sent to it (the fuzzed users change no mail).
PUBLIC_URL = "https://93.184.215.14/email"
# The contract services know one OAuth2 provider and one return URL (``OAUTH2_ENV``); nothing is
# ever sent to the provider (creating an authorization URL needs no request).
OAUTH2_PROVIDER = "google"
OAUTH2_RETURN_URL = "https://app.example.com/mail"
OAUTH2_ENV = {
    "EMAIL_SERVICE_OAUTH2_PROVIDERS": OAUTH2_PROVIDER,
    "EMAIL_SERVICE_OAUTH2_GOOGLE_CLIENT_ID": "contract-tests",
    "EMAIL_SERVICE_OAUTH2_GOOGLE_CLIENT_SECRET": "contract-tests-secret",
    "EMAIL_SERVICE_OAUTH2_RETURN_URLS": OAUTH2_RETURN_URL,
}
ACCOUNT_PATHS = ("/api/accounts", "/api/accounts/{accountId}")
# The operations the API answers by talking to the account's mail server itself (folders). In
# the CLI run, which follows created accounts into them, a generated account names a server that
# does not exist, and the contract's answer when the mail server cannot be reached is 503, not a
# failure of the service: for these alone the check that no answer is a server error takes 503
# too (any other 5xx still fails).
CLI_CONFIG = """
[[operations]]
include-operation-id = ["createFolder", "updateFolder", "deleteFolder"]

[operations.checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503"]
"""


def patterns(raw_schema: dict[str, Any]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The spec's patterns of a mail server's host name and of a webhook URL."""
    schemas = raw_schema["components"]["schemas"]
    host = schemas["CreateAccountRequest"]["properties"]["hostname"]["pattern"]
    url = schemas["CreateWebhookRequest"]["properties"]["url"]
    return re.compile(host), re.compile(f"(?=.{{1,{url['maxLength']}}}$){url['pattern']}", re.DOTALL)


def fit_destinations(body: Any, raw_schema: dict[str, Any], policy: DestinationPolicy) -> None:
    """Only values the spec accepts are changed: a case meant to break the schema stays broken."""
    if not isinstance(body, dict):
        return
    host_name, url_pattern = patterns(raw_schema)
    for field, port in HOST_FIELDS:
        value = body.get(field)
        if isinstance(value, str) and host_name.fullmatch(value):
            number = body.get(port)
            valid_port = type(number) is int and 1 <= number <= 65535
            try:
                check(value, number if valid_port else 993, policy)
            except DestinationRefused:
                body[field] = "mail.example.com"
    url = body.get("url")
    if isinstance(url, str) and url_pattern.fullmatch(url):
        try:
            webhook_urls.check(url, policy)
        except (DestinationRefused, webhook_urls.WebhookUrlError):
            body["url"] = PUBLIC_URL


def fit_oauth2(case: Any) -> None:
    """Generated accounts log in with a password; consent flows use the configured provider and return URL.

    An oauth2 account needs a refresh token of a configured provider, and a password account
    (the default) needs a password: rules across fields the spec cannot state, covered by
    tests/test_oauth2_accounts.py. Only values the spec accepts are changed.
    """
    body = case.body
    path = case.operation.path
    if path in ACCOUNT_PATHS and isinstance(body, dict):
        if body.get("authType") == "oauth2":
            body["authType"] = "password"
        if isinstance(body.get("oauth2"), dict):
            del body["oauth2"]
        if case.method.upper() == "POST" and "password" not in body:
            body["password"] = "generated-password"
    if path == "/api/oauth2/{provider}/authorize":
        provider = (case.path_parameters or {}).get("provider")
        if isinstance(provider, str) and re.fullmatch(r"[a-z0-9][a-z0-9_-]*", provider) and len(provider) <= 64:
            case.path_parameters["provider"] = OAUTH2_PROVIDER
        if isinstance(body, dict) and isinstance(body.get("returnUrl"), str) and 0 < len(body["returnUrl"]) <= 2048:
            body["returnUrl"] = OAUTH2_RETURN_URL
