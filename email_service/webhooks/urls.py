"""Which webhook URLs may be called: the destination policy of mail servers, and https.

A webhook URL names a host the service will connect to on a user's behalf, exactly like an
account's mail server, so the same policy applies (``protocols.destinations``): the name is
resolved, every address is checked, and the request goes to an address that passed. Plain http
is accepted only for hosts the operator allow-listed (an internal receiver); anything on the
internet must be https, so a signature is not the only thing keeping a payload private.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import idna

from email_service.protocols.destinations import DestinationPolicy, DestinationRefused, normalize_host, resolve

MAX_URL_LENGTH = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}


class WebhookUrlError(ValueError):
    """The URL is malformed or not of a kind the service calls; the message says why."""


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str  # normalized: lower case, no brackets, no trailing dot; an A-label if international
    port: int

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"


def parse(url: str) -> Target:
    if len(url) > MAX_URL_LENGTH:
        raise WebhookUrlError(f"url is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlError(f"url is not a valid URL ({exc})") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise WebhookUrlError("url must start with https:// (or http:// for an allow-listed host)")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlError("url must not carry a user name or password; use the signature to authenticate")
    if not parts.hostname:
        raise WebhookUrlError("url has no host")
    if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        raise WebhookUrlError("url must not contain spaces or control characters")
    host = normalize_host(parts.hostname)
    if not host.isascii():
        # An international name travels as its A-label (RFC 5891): in the Host header, for SNI and
        # for the certificate check alike, which all take ASCII only.
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise WebhookUrlError("url's host is not a valid international domain name") from None
    return Target(url=url, scheme=parts.scheme, host=host, port=port or DEFAULT_PORTS[parts.scheme])


def _allow_listed(target: Target, address: str, policy: DestinationPolicy) -> bool:
    ip = ipaddress.ip_address(address.partition("%")[0])
    return any(entry.matches(target.host, ip, target.port) for entry in policy.allowed)


def permitted_addresses(target: Target, policy: DestinationPolicy) -> list[tuple[int, tuple]]:
    """The addresses a request to ``target`` may go to; raises ``DestinationRefused`` or ``socket.gaierror``.

    For http every address must also be allow-listed by the operator: a public receiver
    without TLS would expose users' mail metadata on the way.
    """
    addresses = resolve(target.host, target.port, policy)
    if target.scheme == "http":
        addresses = [(family, sockaddr) for family, sockaddr in addresses if _allow_listed(target, sockaddr[0], policy)]
        if not addresses:
            raise DestinationRefused(target.host, target.port)
    return addresses


def check(url: str, policy: DestinationPolicy) -> Target:
    """Refuse at create what the dispatcher would refuse at delivery; an unresolvable https name passes.

    The same check runs again before every delivery, so a name that resolves later (or resolves
    differently) is still held to the policy.
    """
    target = parse(url)
    try:
        permitted_addresses(target, policy)
    except (socket.gaierror, UnicodeError):
        if target.scheme == "http":
            raise DestinationRefused(target.host, target.port) from None
    return target
