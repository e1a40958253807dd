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
