"""SASL initial responses that carry an OAuth2 bearer token (the raw bytes; each client base64s them)."""

from __future__ import annotations


def xoauth2(user: str, token: str) -> bytes:
    """Google's and Microsoft's XOAUTH2."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user: str, token: str, host: str, port: int) -> bytes:
    """RFC 7628 OAUTHBEARER: a GS2 header naming the user (',' and '=' escaped), then key=value pairs."""
    authzid = user.replace("=", "=3D").replace(",", "=2C")
    return f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01".encode()


def choose(mechanisms: set[str] | frozenset[str]) -> str:
    """OAUTHBEARER (the standard) where the server offers it, XOAUTH2 otherwise."""
    return "OAUTHBEARER" if "OAUTHBEARER" in mechanisms else "XOAUTH2"


def initial_response(mechanism: str, user: str, token: str, host: str, port: int) -> bytes:
    if mechanism == "OAUTHBEARER":
        return oauthbearer(user, token, host, port)
    return xoauth2(user, token)
