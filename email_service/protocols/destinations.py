"""Which mail servers the service may connect to: public addresses, plus what the operator allows.

Accounts name their own servers, so without a policy any tenant could make the service connect
to the machine it runs on, the cloud metadata endpoint or anything else on the internal network,
and read what answered in the task's error. The policy is applied to the addresses a host name
*resolves to*: resolvers accept ``0``, ``127.1``, ``2130706433``, ``0x7f000001``, ``0177.0.0.1``
and ``localhost`` as spellings of local addresses, so checking the name as written can never be
complete. ``resolve`` returns only permitted addresses, and the connection code connects to
exactly those (never resolving the name a second time, which a rebinding DNS server could answer
differently).

This module is the only place that decides; the account service (at create and update) and the
connection code (``protocols.connect``) both call ``resolve``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

from email_service.protocols.errors import ConnectionFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 6052 well-known NAT64 prefix: the last 32 bits are the IPv4 address actually reached.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")

Resolver = Callable[..., list]


class DestinationRefused(ConnectionFailed):
    """The destination is not a public address and not allowed by the operator; it was not contacted."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"destination not allowed: {host}:{port} is not a public address "
            "(private, loopback, link-local and reserved networks are refused unless the operator allows them)"
        )
        self.host, self.port = host, port


@dataclass(frozen=True)
class AllowedDestination:
    """One operator exception: a network (``network``) or a host name as written (``name``), optionally one port."""

    network: IPNetwork | None = None
    name: str | None = None
    port: int | None = None

    def matches(self, name: str, address: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.name is not None:
            return self.name == name
        return self.network is not None and address.version == self.network.version and address in self.network

    def __str__(self) -> str:
        where = self.name or str(self.network)
        if self.port is None:
            return where
        return f"[{where}]:{self.port}" if ":" in where else f"{where}:{self.port}"


@dataclass(frozen=True)
class DestinationPolicy:
    """Public addresses are permitted; anything else only through ``allowed``."""

    allowed: tuple[AllowedDestination, ...] = ()

    def permits(self, name: str, address: IPAddress, port: int) -> bool:
        return is_public(address) or any(entry.matches(name, address, port) for entry in self.allowed)


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address, whichever way it is written."""
    if isinstance(address, ipaddress.IPv6Address):
        # Addresses that carry an IPv4 address reach that address: judge it instead.
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in _NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            return is_public(inner)
        if address.is_site_local:
            return False
    # is_global alone lets multicast and some reserved ranges through (224.0.0.1 is "global").
    return address.is_global and not (
        address.is_multicast
        or address.is_reserved
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_private
    )


def normalize_host(host: str) -> str:
    """The host as compared with allow-list names: lower case, no trailing dot, no IPv6 brackets."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def resolve(
    host: str, port: int, policy: DestinationPolicy, *, resolver: Resolver = socket.getaddrinfo
) -> list[tuple[int, tuple]]:
    """(family, sockaddr) pairs for ``host`` that ``policy`` permits, in the resolver's order.

    Raises ``DestinationRefused`` when the name resolves only to refused addresses, and
    ``socket.gaierror`` when it does not resolve at all.
    """
    name = normalize_host(host)
    if not name:
        raise DestinationRefused(host, port)
    permitted: list[tuple[int, tuple]] = []
    for family, _, _, _, sockaddr in resolver(name, port, type=socket.SOCK_STREAM):
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        except ValueError:
            continue
        if policy.permits(name, address, port) and (family, sockaddr) not in permitted:
            permitted.append((family, sockaddr))
    if not permitted:
        raise DestinationRefused(host, port)
    return permitted


def check(host: str, port: int, policy: DestinationPolicy) -> None:
    """Refuse a destination when an account is saved; a name that does not resolve yet is let through.

    The same check runs again before every connection, so a name that resolves later (or
    resolves differently) is still held to the policy.
    """
    try:
        resolve(host, port, policy)
    except (socket.gaierror, UnicodeError):
        return


def parse_allowed(raw: str) -> tuple[AllowedDestination, ...]:
    """Comma-separated ``HOST``, ``IP`` or ``CIDR`` entries, each optionally with ``:PORT``.

    IPv6 addresses and networks take brackets when a port follows: ``[fd00::/8]:993``.
    Raises ``ValueError`` with a message naming the entry.
    """
    return tuple(_parse_entry(item.strip()) for item in raw.split(",") if item.strip())


def _parse_entry(entry: str) -> AllowedDestination:
    where, port = _split_port(entry)
    try:
        network = ipaddress.ip_network(where, strict=True)
    except ValueError as exc:
        if "/" in where or ":" in where or re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+", where):
            # Addresses must be written in their standard form; "127.1" would be a host name otherwise.
            raise ValueError(f"{entry!r} is not a valid IP address or network ({exc})") from None
        if _odd_ipv4(where):
            # "127.1" or "0x7f000001" as a name would read as an address to whoever reads the setting.
            raise ValueError(f"{entry!r}: write IPv4 addresses as four decimal numbers (a.b.c.d)") from None
        name = normalize_host(where)
        if not _HOST_NAME.match(name):
            raise ValueError(f"{entry!r} is not a host name, IP address or network") from None
        return AllowedDestination(name=name, port=port)
    return AllowedDestination(network=network, port=port)


def _odd_ipv4(text: str) -> bool:
    try:
        socket.inet_aton(text)
    except OSError:
        return False
    return True


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        inner, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r}: write an IPv6 entry as [ADDRESS] or [ADDRESS]:PORT")
        return inner, _port(entry, rest[1:]) if rest else None
    if entry.count(":") == 1:
        where, _, port = entry.partition(":")
        return where, _port(entry, port)
    return entry, None


def _port(entry: str, raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return int(raw)
