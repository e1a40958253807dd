"""Email address validation (email-validator), tuned for mail servers that are not public.

Accounts and recipients may live on intranet or test domains (``corp.local``, ``mail.internal``,
``*.test``); email-validator refuses special-use names by default, which suits sign-up forms,
not a service that logs in to whatever server a user runs. Syntax rules still apply in full.
"""

from __future__ import annotations

import email_validator
from email_validator import EmailNotValidError, validate_email

# Read by email-validator at call time; emptied once, for this process, on purpose.
email_validator.SPECIAL_USE_DOMAIN_NAMES = []


class InvalidAddress(ValueError):
    pass


def normalize(address: str) -> str:
    """The normalised form of a syntactically valid address; raises ``InvalidAddress`` otherwise."""
    try:
        return validate_email(address, check_deliverability=False, globally_deliverable=False).normalized
    except EmailNotValidError as exc:
        raise InvalidAddress(str(exc)) from None
