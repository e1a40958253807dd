"""Email address validation (email-validator), tuned for mail servers that are not public.

Accounts and recipients may live on intranet or test domains (``corp.local``, ``mail.internal``,
``*.test``); email-validator refuses special-use names by default, which suits sign-up forms,
not a service that logs in to whatever server a user runs. Syntax rules still apply in full.

Account addresses are also kept in one canonical form, so that two spellings of one mailbox are
one address and a look-alike of another address is refused rather than stored beside it.
"""

from __future__ import annotations

import unicodedata

import email_validator
from confusable_homoglyphs import categories
from email_validator import EmailNotValidError, validate_email

# Read by email-validator at call time; emptied once, for this process, on purpose.
email_validator.SPECIAL_USE_DOMAIN_NAMES = []

# Characters of these "scripts" appear in every script's text (digits, punctuation, marks).
_SHARED_SCRIPTS = frozenset({"COMMON", "INHERITED"})
# The script mixes Unicode's "Highly Restrictive" level allows (UTS #39, section 5.2): Japanese,
# Chinese and Korean writing combine these with Latin. Any other mix, such as Cyrillic "а" in a
# Latin name, is how look-alike addresses are made.
_ALLOWED_MIXES = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)


class InvalidAddress(ValueError):
    pass


def normalize(address: str) -> str:
    """The normalised form of a syntactically valid address; raises ``InvalidAddress`` otherwise."""
    try:
        return validate_email(address, check_deliverability=False, globally_deliverable=False).normalized
    except EmailNotValidError as exc:
        raise InvalidAddress(str(exc)) from None


def canonical(address: str) -> str:
    """An account address in its one stored form; raises ``InvalidAddress`` for look-alikes.

    NFKC folds compatibility forms (fullwidth ``ｊｏｈｎ`` is ``john``); email-validator checks
    the syntax, NFC-normalises the local part and applies IDNA (UTS #46) to the domain, which is
    kept in its ASCII form (``xn--bcher-kva.example``). A local part or domain label that mixes
    scripts is refused.
    """
    try:
        valid = validate_email(
            unicodedata.normalize("NFKC", address), check_deliverability=False, globally_deliverable=False
        )
    except EmailNotValidError as exc:
        raise InvalidAddress(str(exc)) from None
    _require_single_script(valid.local_part, "the part before @")
    for label in valid.domain.split("."):
        _require_single_script(label, "the domain")
    return f"{valid.local_part}@{valid.ascii_domain}"


def comparison_key(canonical_address: str) -> str:
    """What two addresses must share to be the same mailbox: the canonical form, case-folded.

    Local parts are case-sensitive by the letter of RFC 5321 but not at any provider in use, and
    a service that let ``John@`` and ``john@`` be two accounts would invite confusion.
    """
    return canonical_address.casefold()


def _require_single_script(text: str, where: str) -> None:
    scripts = {categories.alias(char) for char in text} - _SHARED_SCRIPTS
    if len(scripts) > 1 and not any(scripts <= allowed for allowed in _ALLOWED_MIXES):
        names = ", ".join(sorted(script.title() for script in scripts))
        raise InvalidAddress(f"{where} mixes scripts ({names}), as look-alike addresses do")
