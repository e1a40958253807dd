"""Connexion's security handlers for the spec's two schemes, without re-reading a signature per request.

Before it calls a token-info function, Connexion's handler asks whether the function takes the
``required_scopes`` and ``request`` keywords, by building its ``inspect.signature`` twice, on
every request. The functions are the spec's ``x-bearerInfoFunc``/``x-apikeyInfoFunc``, fixed
for the life of the app, and the two signatures were 8% of the event loop's time on a small
request. The answer per (function, keyword) is kept instead; everything else is Connexion's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from connexion.security import AbstractSecurityHandler, ApiKeySecurityHandler, BearerSecurityHandler


# Bounded all the same: should a Connexion release ever hand over a function made per request,
# the cache would stop helping but could not grow.
@functools.lru_cache(maxsize=64)
def _accepts_kwarg(func: Callable, keyword: str) -> bool:
    return AbstractSecurityHandler._accepts_kwarg(func, keyword)


class _KnownSignatures:
    _accepts_kwarg = staticmethod(_accepts_kwarg)


class KnownSignatureBearerHandler(_KnownSignatures, BearerSecurityHandler):
    """``Authorization: Bearer`` tokens, as Connexion checks them."""


class KnownSignatureApiKeyHandler(_KnownSignatures, ApiKeySecurityHandler):
    """``X-Auth-Token`` tokens, as Connexion checks them."""


SECURITY_MAP = {"bearer": KnownSignatureBearerHandler, "apiKey": KnownSignatureApiKeyHandler}
