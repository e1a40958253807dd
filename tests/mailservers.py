"""Real mail servers for tests (Dovecot IMAP/POP3, aiosmtpd SMTP), started by fixtures.

Fixtures (registered through ``pytest_plugins = ["mailservers"]`` in conftest.py):

- ``mail_tls`` (session): a private CA and a server certificate for ``localhost``/``127.0.0.1``;
  one ``ca_file`` verifies every server below.
- ``dovecot`` (session): a private Dovecot (IMAP, IMAPS, POP3, POP3S) on free ports; installs
  ``dovecot-imapd``/``dovecot-pop3d`` with apt-get when they are missing.
- ``german_dovecot`` (session): another such Dovecot whose role folders have German names.
- ``mail_user`` (function): a fresh user on ``dovecot``.
- ``smtp_server`` (function): a factory starting aiosmtpd servers, stopped after the test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import imaplib
import ipaddress
import os
import poplib
import re
import secrets
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import ensure_debian_packages

LOCALHOST = "localhost"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """A private CA and a server certificate signed by it (SAN: DNS:localhost, IP:127.0.0.1)."""

    ca_file: str
    cert_file: str  # server certificate followed by the CA, so servers send the whole chain
    key_file: str

    def client_context(self) -> ssl.SSLContext:
        """A client context that verifies the chain against ``ca_file`` and checks the host name."""
        return ssl.create_default_context(cafile=self.ca_file)

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def make_tls_files(directory: Path, *, ip_san: bool = True) -> TlsFiles:
    """Write a CA and a server certificate into ``directory`` (without the IP SAN if not ``ip_san``).

    A real CA plus a leaf (rather than one self-signed leaf) so that clients doing strict X.509
    checks (CA:TRUE on the anchor, CA:FALSE and serverAuth on the leaf) accept it too.
    """
    now = dt.datetime.now(dt.UTC)
    validity = (now - dt.timedelta(hours=1), now + dt.timedelta(days=30))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "email_service test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOCALHOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(LOCALHOST)] + ([x509.IPAddress(ipaddress.ip_address(LOOPBACK))] if ip_san else [])
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    ca_file = directory / "ca.pem"
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    ca_file.write_bytes(ca_cert.public_bytes(pem))
    cert_file.write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_file.chmod(0o600)
    return TlsFiles(str(ca_file), str(cert_file), str(key_file))


# --------------------------------------------------------------------------- IMAP helpers


def imap_utf7_encode(name: str) -> str:
    """Encode a mailbox name in IMAP modified UTF-7 (RFC 3501 5.1.3); imaplib does not."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def imap_utf7_decode(name: str) -> str:
    def decode(match: re.Match[str]) -> str:
        chunk = match.group(1)
        if not chunk:
            return "&"
        chunk = chunk.replace(",", "/")
        return base64.b64decode(chunk + "=" * (-len(chunk) % 4)).decode("utf-16-be")

    return re.sub(r"&([^-]*)-", decode, name)


def quote_mailbox(name: str) -> str:
    """A mailbox name ready for an imaplib command: modified UTF-7, then quoted.

    imaplib sends str arguments verbatim, so names with spaces or non-ASCII need this.
    """
    encoded = imap_utf7_encode(name).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{encoded}"'


def _check(result: tuple[str, list[Any]], what: str) -> list[Any]:
    typ, data = result
    if typ != "OK":
        raise AssertionError(f"{what} failed: {typ} {data!r}")
    return data


# --------------------------------------------------------------------------- Dovecot

DOVECOT_BIN = "/usr/sbin/dovecot"
# The protocol binaries come from dovecot-imapd and dovecot-pop3d; dovecot-core alone is not enough.
DOVECOT_NEEDED = (DOVECOT_BIN, "/usr/lib/dovecot/imap", "/usr/lib/dovecot/pop3")
DOVECOT_PACKAGES = ("dovecot-imapd", "dovecot-pop3d")
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Junk": "\\Junk", "Trash": "\\Trash"}
# A mailbox as a German-localised server sets it up: German names, marked with SPECIAL-USE.
GERMAN_SPECIAL_USE = {"Gesendet": "\\Sent", "Entwürfe": "\\Drafts", "Spam": "\\Junk", "Papierkorb": "\\Trash"}


def ensure_dovecot_installed() -> None:
    """Install Dovecot's IMAP and POP3 servers with apt-get unless they are there already."""
    ensure_debian_packages(DOVECOT_NEEDED, DOVECOT_PACKAGES)


@dataclass(frozen=True)
class MailUser:
    name: str  # the login name for IMAP and POP3
    password: str
    address: str  # an e-mail address for From/To headers; not routed anywhere


# What a passwd-file entry and its file name can hold: no ":", "/" or control characters, and
# not a dot file. Spaces, quotes, backslashes and non-ASCII are fine (Dovecot allows them, see
# auth_username_chars below); use lower case, as Dovecot looks names up lower-cased.
_USER_NAME = re.compile(r"^[^\s:/.\x00-\x1f\x7f][^:/\x00-\x1f\x7f]*$")


# The SASL mechanisms for bearer tokens the test servers offer by default (with introspection).
OAUTH2_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")


class Dovecot:
    """A private Dovecot on 127.0.0.1 with its own config, users and maildirs under ``base_dir``.

    Ports: ``imap_port`` (plain + STARTTLS), ``imaps_port`` (implicit TLS), ``pop3_port``
    (plain + STLS), ``pop3s_port`` (implicit TLS). Connect to ``host`` ("localhost") whenever TLS
    is involved so the host name is checked; ``ip`` ("127.0.0.1") is for plain connections.
    """

    host = LOCALHOST
    ip = LOOPBACK

    def __init__(
        self,
        base_dir: Path,
        tls: TlsFiles,
        *,
        extra_config: str = "",
        special_use: dict[str, str] | None = None,
        oauth2_introspection_url: str = "",
        oauth2_mechanisms: tuple[str, ...] = OAUTH2_MECHANISMS,
    ) -> None:
        self.base_dir = base_dir
        self.special_use = SPECIAL_USE if special_use is None else special_use  # every user's role folders
        self.tls = tls
        self.extra_config = extra_config  # appended to the generated configuration (benchmarks)
        # With an RFC 7662 introspection URL (credentials in it), IMAP also accepts XOAUTH2 and
        # OAUTHBEARER, checking each token there, as a provider's server checks its own.
        self.oauth2_introspection_url = oauth2_introspection_url
        # Which of the two token mechanisms it offers (Microsoft's servers offer only XOAUTH2).
        self.oauth2_mechanisms = oauth2_mechanisms
        self.ca_file = tls.ca_file
        self.instance = base_dir.name  # unique, and prefixes every process title of this instance
        self.config_file = base_dir / "dovecot.conf"
        self.passwd_dir = base_dir / "users"
        self.mail_root = base_dir / "mail"
        self.log_file = base_dir / "dovecot.log"
        self.users: dict[str, MailUser] = {}
        self._users_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self.imap_port = self.imaps_port = self.pop3_port = self.pop3s_port = 0

    # ---- lifecycle

    def setup(self) -> None:
        # Login processes run as dovenull and mail processes as nobody: both must reach base_dir.
        self.base_dir.chmod(0o755)
        for sub in ("run", "state"):
            (self.base_dir / sub).mkdir()
        self.mail_root.mkdir()
        shutil.chown(self.mail_root, "nobody", "nogroup")
        self.passwd_dir.mkdir(mode=0o755)

    def _write_config(self) -> None:
        d = self.base_dir
        dh = "/usr/share/dovecot/dh.pem"
        mailboxes = "\n".join(
            f'  mailbox "{name}" {{\n    special_use = {flag}\n    auto = subscribe\n  }}'
            for name, flag in self.special_use.items()
        )
        config = f"""\
# Generated by tests/mailservers.py; nothing from /etc/dovecot is read.
instance_name = {self.instance}
base_dir = {d}/run
state_dir = {d}/state
log_path = {self.log_file}
info_log_path = {self.log_file}
listen = {LOOPBACK}
protocols = imap pop3
shutdown_clients = yes

ssl = yes
ssl_cert = <{self.tls.cert_file}
ssl_key = <{self.tls.key_file}
ssl_min_protocol = TLSv1.2
{f"ssl_dh = <{dh}" if os.path.exists(dh) else ""}

# Plain-text logins on the plain ports too: the service must be testable with encryption "none".
disable_plaintext_auth = no
auth_mechanisms = plain login{" " + self._oauth2_mechanism_names if self.oauth2_introspection_url else ""}
auth_cache_size = 0
# Any user name, as servers that take DOMAIN\\user or "first last" do (the default allows only
# letters, digits and ".-_@").
auth_username_chars =
# Wrong-password tests should not wait: no fixed delay per failed login, and no penalty growing
# per client IP (2, 4, ... 15 s), which the auth process skips when anvil has no penalty socket.
auth_failure_delay = 0
# One passwd-file per user: Dovecot re-reads a changed passwd-file only when its last check was in
# an earlier second, so a user appended to one shared file may stay unknown for up to a second.
# A new file is read on first use.
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_dir}/%u
  mechanisms = plain login
}}
{self._oauth2_passdb()}userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={self.mail_root}/%u
}}
# Watchers hold one IDLE connection (one imap process) per watched account, and the suite creates
# many accounts: Dovecot's default of 100 processes per service would make later logins queue.
default_process_limit = 1000
default_client_limit = 4000
# Dovecot refuses to access mail as root.
mail_uid = nobody
mail_gid = nogroup
# LAYOUT=fs so that "/" is the hierarchy separator and "." is allowed in folder names.
mail_location = maildir:~/Maildir:LAYOUT=fs
mail_fsync = never
# IDLE falls back to polling where inotify is missing (sandboxes); poll often.
mailbox_idle_check_interval = 1 secs

namespace inbox {{
  inbox = yes
  separator = /
{mailboxes}
}}

service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}

protocol imap {{
  mail_max_userip_connections = 200
}}
protocol pop3 {{
  mail_max_userip_connections = 200
}}

# Login processes in high-performance mode, as large installations run them: one process serves
# many logins, so a login costs no fork and TLS tickets resume (each process has its own keys).
service imap-login {{
  service_count = 0
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  service_count = 0
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = {self.pop3s_port}
    ssl = yes
  }}
}}
{self.extra_config}
"""
        self.config_file.write_text(config)

    @property
    def _oauth2_mechanism_names(self) -> str:
        return " ".join(mechanism.lower() for mechanism in self.oauth2_mechanisms)

    def _oauth2_passdb(self) -> str:
        if not self.oauth2_introspection_url:
            return ""
        # introspection_mode = post: the token is POSTed (RFC 7662) and the answer's username must
        # be the user logging in; an inactive token's answer has none, so it is refused.
        (self.base_dir / "oauth2.conf").write_text(
            f"introspection_mode = post\n"
            f"introspection_url = {self.oauth2_introspection_url}\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n"
            "force_introspection = yes\n"
        )
        return (
            f"passdb {{\n  driver = oauth2\n  mechanisms = {self._oauth2_mechanism_names}\n"
            f"  args = {self.base_dir}/oauth2.conf\n}}\n"
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20) -> None:
        """Start (or restart) the server on the same ports, with the same users and mail."""
        if self.running:
            return
        if not self.imap_port:
            self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port = (free_port() for _ in range(4))
        self._write_config()
        log = self.log_file.open("ab")
        try:
            self._proc = subprocess.Popen(
                [DOVECOT_BIN, "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        checks: list[tuple[int, bool, bytes]] = [
            (self.imap_port, False, b"* OK"),
            (self.imaps_port, True, b"* OK"),
            (self.pop3_port, False, b"+OK"),
            (self.pop3s_port, True, b"+OK"),
        ]
        context = self.tls.client_context()
        while checks:
            port, use_tls, greeting = checks[0]
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self._proc and self._proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, port), timeout=2) as raw:
                    sock = context.wrap_socket(raw, server_hostname=self.host) if use_tls else raw
                    with sock, sock.makefile("rb") as reader:
                        line = reader.readline()
                if line.startswith(greeting):
                    checks.pop(0)
                    continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dovecot gave no greeting on port {port} within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> None:
        """Stop the server; connected clients are cut off. Users and mail stay for ``start()``."""
        proc, self._proc = self._proc, None
        # The master alone is not enough: on this machine its children (imap, imap-login, auth,
        # log, ...) outlive it and keep serving connected clients. Stop all of them at once.
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.pids() and time.monotonic() < deadline + 5:
            time.sleep(0.02)

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """The server is unreachable inside the block and serving again after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def pids(self) -> list[int]:
        """Processes of this instance (master and children), found by their process titles."""
        title = f"dovecot-{self.instance}/".encode()  # children: "dovecot-<instance_name>/imap" etc.
        master = f"{DOVECOT_BIN}\0-F\0-c\0{self.config_file}\0".encode()
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(title) or cmdline.startswith(master):
                found.append(int(entry.name))
        return found

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    # ---- users

    def add_user(self, name: str | None = None, password: str | None = None) -> MailUser:
        """Add a user, at once usable for logins, while the server runs (no restart, no wait)."""
        name = name or f"u{secrets.token_hex(5)}"
        password = password or secrets.token_urlsafe(12)
        if not _USER_NAME.match(name) or any(c in password for c in ":\n\r"):
            raise ValueError(f"unusable user name or password for a passwd-file: {name!r}")
        user = MailUser(name=name, password=password, address=name if "@" in name else f"{name}@example.com")
        with self._users_lock:
            if name in self.users:
                raise ValueError(f"user {name!r} exists")
            self.users[name] = user
        # Written whole and renamed into place so the auth process never reads half a file.
        tmp = self.passwd_dir / f".{name}.tmp"
        # Dovecot looks a user up in a passwd-file by the name with "\\" and '"' escaped.
        entry = name.replace("\\", "\\\\").replace('"', '\\"')
        tmp.write_text(f"{entry}:{{PLAIN}}{password}::::::\n")
        tmp.chmod(0o644)  # read by the auth process, which runs as the dovecot user
        tmp.replace(self.passwd_dir / name)
        return user

    def maildir(self, user: MailUser) -> Path:
        return self.mail_root / user.name / "Maildir"

    # ---- independent clients (verification always on)

    def ssl_context(self) -> ssl.SSLContext:
        return self.tls.client_context()

    def imap(self, user: MailUser, *, starttls: bool = False) -> imaplib.IMAP4:
        """A logged-in imaplib client over implicit TLS (or STARTTLS on the plain port)."""
        if starttls:
            client: imaplib.IMAP4 = imaplib.IMAP4(self.host, self.imap_port, timeout=30)
            client.starttls(ssl_context=self.ssl_context())
        else:
            client = imaplib.IMAP4_SSL(self.host, self.imaps_port, ssl_context=self.ssl_context(), timeout=30)
        # AUTHENTICATE PLAIN (UTF-8) rather than imaplib's login(), which sends the name unquoted
        # and refuses non-ASCII: test users may have any name and password.
        credentials = b"\0" + user.name.encode() + b"\0" + user.password.encode()
        client.authenticate("PLAIN", lambda _challenge: credentials)
        return client

    def pop3(self, user: MailUser, *, stls: bool = False) -> poplib.POP3:
        """A logged-in poplib client over implicit TLS (or STLS on the plain port)."""
        if stls:
            client: poplib.POP3 = poplib.POP3(self.host, self.pop3_port, timeout=30)
            client.stls(context=self.ssl_context())
        else:
            client = poplib.POP3_SSL(self.host, self.pop3s_port, context=self.ssl_context(), timeout=30)
        client.user(user.name)
        client.pass_(user.password)
        return client

    def append(
        self,
        user: MailUser,
        folder: str,
        raw: bytes,
        flags: Iterable[str] = (),
        internaldate: dt.datetime | float | None = None,
    ) -> int:
        """APPEND one message; returns its UID (from APPENDUID). Creates nothing: the folder must exist."""
        return self.append_many(user, folder, [raw], flags, internaldate)[0]

    def append_many(
        self,
        user: MailUser,
        folder: str,
        messages: Iterable[bytes],
        flags: Iterable[str] = (),
        internaldate: dt.datetime | float | None = None,
    ) -> list[int]:
        """APPEND several messages over one connection (much faster for benchmarks); returns UIDs."""
        flag_list = f"({' '.join(flags)})" if flags else None
        date = imaplib.Time2Internaldate(internaldate) if internaldate is not None else None
        uids = []
        with self.imap(user) as client:
            for raw in messages:
                typ, data = client.append(quote_mailbox(folder), flag_list, date, raw)
                if typ != "OK":
                    raise AssertionError(f"APPEND to {folder!r} failed: {data!r}")
                match = re.search(rb"APPENDUID \d+ (\d+)", data[0] or b"")
                if not match:
                    raise AssertionError(f"no APPENDUID in {data!r}")
                uids.append(int(match.group(1)))
        return uids

    def create_folder(self, user: MailUser, folder: str, *, subscribe: bool = True) -> None:
        with self.imap(user) as client:
            _check(client.create(quote_mailbox(folder)), f"CREATE {folder}")
            if subscribe:
                _check(client.subscribe(quote_mailbox(folder)), f"SUBSCRIBE {folder}")

    def uidvalidity(self, user: MailUser, folder: str) -> int:
        with self.imap(user) as client:
            data = _check(client.status(quote_mailbox(folder), "(UIDVALIDITY)"), f"STATUS {folder}")
        return int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))

    def recreate_folder(self, user: MailUser, folder: str) -> int:
        """Delete and recreate a folder (all its mail goes); returns the new, different UIDVALIDITY."""
        with self.imap(user) as client:
            _check(client.delete(quote_mailbox(folder)), f"DELETE {folder}")
            _check(client.create(quote_mailbox(folder)), f"CREATE {folder}")
            _check(client.subscribe(quote_mailbox(folder)), f"SUBSCRIBE {folder}")
        return self.uidvalidity(user, folder)


_SESSION_DOVECOTS: list[Dovecot] = []


@pytest.fixture(scope="session")
def mail_tls() -> Iterator[TlsFiles]:
    directory = Path(tempfile.mkdtemp(prefix="mtls-"))
    directory.chmod(0o755)
    try:
        yield make_tls_files(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def running_dovecot(tls: TlsFiles, **options: Any) -> Iterator[Dovecot]:
    """A started private Dovecot (``options`` go to ``Dovecot``), restarted if a test stops it."""
    ensure_dovecot_installed()
    # Short and under /tmp: Dovecot's unix sockets live in base_dir (108-byte path limit).
    server = Dovecot(Path(tempfile.mkdtemp(prefix="dvc-")), tls, **options)
    try:
        server.setup()
        for attempt in range(3):
            try:
                server.start()
                break
            except RuntimeError:
                # Another process may have taken one of the free ports in between: pick new ones.
                if attempt == 2 or "in use" not in server.log_tail():
                    raise
                server.imap_port = 0
        _SESSION_DOVECOTS.append(server)
        yield server
    finally:
        with contextlib.suppress(ValueError):
            _SESSION_DOVECOTS.remove(server)
        server.stop()
        shutil.rmtree(server.base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot(mail_tls: TlsFiles) -> Iterator[Dovecot]:
    with running_dovecot(mail_tls) as server:
        yield server


@pytest.fixture(scope="session")
def german_dovecot(mail_tls: TlsFiles) -> Iterator[Dovecot]:
    """A second Dovecot whose users' role folders have German names (Entwürfe, Gesendet, ...)."""
    with running_dovecot(mail_tls, special_use=GERMAN_SPECIAL_USE) as server:
        yield server


@pytest.fixture(autouse=True)
def _dovecot_back_up() -> Iterator[None]:
    # A test that stopped the shared server and failed before restarting it must not break the
    # tests after it.
    yield
    for server in _SESSION_DOVECOTS:
        if not server.running:
            server.start()


@pytest.fixture
def mail_user(dovecot: Dovecot) -> MailUser:
    return dovecot.add_user()


# --------------------------------------------------------------------------- SMTP

Encryption = Literal["none", "tls", "starttls"]  # the values of the spec's smtpEncryption
FailStage = Literal["mail", "rcpt", "data"]


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # exactly as received after dot-unstuffing, CRLF line ends
    auth_login: str | None  # the authenticated user, None without AUTH
    tls: bool  # whether the transaction ran over TLS (implicit or STARTTLS)


@dataclass
class _Behaviour:
    temp_failures: int = 0
    reject: bool = False
    fail_at: FailStage = "data"
    unknown_recipients: set[str] = field(default_factory=set)
    silent_after_data: float = 0.0  # seconds to say nothing after the final dot (then accept)
    max_recipients: int = 0  # recipients a transaction takes (0: any); more get 452 4.5.3
    busy_recipients: set[str] = field(default_factory=set)  # these get 450 4.2.1 at RCPT TO


class SmtpServer:
    """An aiosmtpd server on 127.0.0.1 in a thread, recording every accepted message.

    ``temp_failures``: the first N transactions (counted at MAIL FROM) answer
    ``451 4.7.1`` at ``fail_at``, later ones succeed. ``reject``: every transaction answers
    ``550 5.7.1`` at ``fail_at``. ``unknown_recipients``: these addresses get ``550 5.1.1`` at
    RCPT TO (partial failures). ``silent_after_data``: seconds of silence after the final dot
    before the (accepting) reply. ``max_recipients``: a transaction takes at most this many
    recipients (452 4.5.3 beyond), ``busy_recipients`` get 450 4.2.1 every time. All of these
    can also be changed while the server runs.
    """

    host = LOCALHOST
    ip = LOOPBACK

    def __init__(
        self,
        tls: TlsFiles,
        encryption: Encryption,
        *,
        auth_required: bool,
        username: str,
        password: str,
        behaviour: _Behaviour,
        introspect: Callable[[str], dict] | None = None,
        oauth2_mechanisms: tuple[str, ...] = OAUTH2_MECHANISMS,
    ) -> None:
        self.tls = tls
        # With it, the token mechanisms in oauth2_mechanisms are offered, each token checked by this call.
        self.introspect = introspect
        self.oauth2_mechanisms = oauth2_mechanisms
        self.oauth2_logins: list[str] = []  # the mechanism of each successful token login, in order
        self.ca_file = tls.ca_file
        self.encryption = encryption
        self.auth_required = auth_required
        self.username = username
        self.password = password
        self.port = 0
        self.messages: list[ReceivedMessage] = []
        self.attempts = 0  # transactions begun (MAIL FROM commands), accepted or not
        self._behaviour = behaviour
        self._lock = threading.Lock()
        self._received = threading.Condition(self._lock)
        self._controller: Any = None

    # Behaviour knobs, live.
    @property
    def temp_failures(self) -> int:
        return self._behaviour.temp_failures

    @temp_failures.setter
    def temp_failures(self, value: int) -> None:
        self._behaviour.temp_failures = value

    @property
    def reject(self) -> bool:
        return self._behaviour.reject

    @reject.setter
    def reject(self, value: bool) -> None:
        self._behaviour.reject = value

    @property
    def unknown_recipients(self) -> set[str]:
        return self._behaviour.unknown_recipients

    @property
    def silent_after_data(self) -> float:
        return self._behaviour.silent_after_data

    @silent_after_data.setter
    def silent_after_data(self, value: float) -> None:
        self._behaviour.silent_after_data = value

    def start(self) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login.decode() == self.username
                and auth_data.password.decode() == self.password
            )
            if not ok:
                # handled=False makes aiosmtpd answer 535; its default (True) answers nothing at all.
                return AuthResult(success=False, handled=False)
            return AuthResult(success=True, auth_data=auth_data.login.decode())

        kwargs: dict[str, Any] = dict(
            hostname=self.ip,
            server_hostname=self.host,
            authenticator=authenticator,
            # AUTH is enforced at MAIL FROM by the handler: aiosmtpd warns on every connection when
            # auth_required is combined with auth_require_tls=False, which implicit TLS needs.
            auth_required=False,
            decode_data=False,
        )
        if self.encryption == "starttls":
            kwargs.update(tls_context=self.tls.server_context(), require_starttls=True)
        elif self.encryption == "tls":
            # aiosmtpd cannot tell that an implicit-TLS transport is encrypted, so with the default
            # auth_require_tls=True it would never offer AUTH.
            kwargs.update(ssl_context=self.tls.server_context(), auth_require_tls=False)
        else:
            kwargs.update(auth_require_tls=False)
        if self.introspect is not None:
            kwargs.update(auth_exclude_mechanism=[m for m in OAUTH2_MECHANISMS if m not in self.oauth2_mechanisms])
        for attempt in range(5):
            self.port = free_port()
            handler = _SmtpHandler(self) if self.introspect is None else _OAuth2SmtpHandler(self)
            controller = Controller(handler, port=self.port, **kwargs)
            try:
                controller.start()
            except Exception:
                # Lost the race for the free port to another process: try another.
                with contextlib.suppress(Exception):
                    controller.stop()
                if attempt == 4:
                    raise
                continue
            self._controller = controller
            return

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def _decide(self) -> str | None:
        with self._lock:
            self.attempts += 1
            if self._behaviour.reject:
                return "550 5.7.1 Message rejected by test server"
            if self.attempts <= self._behaviour.temp_failures:
                return "451 4.7.1 Temporary failure, try again later"
            return None

    def _record(self, message: ReceivedMessage) -> None:
        with self._received:
            self.messages.append(message)
            self._received.notify_all()

    def wait_for(self, count: int = 1, timeout: float = 10) -> list[ReceivedMessage]:
        """Block until ``count`` messages have arrived (for senders running in other threads)."""
        with self._received:
            if not self._received.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"{len(self.messages)} of {count} messages arrived within {timeout}s")
            return list(self.messages)

    def ssl_context(self) -> ssl.SSLContext:
        return self.tls.client_context()

    def client(self, *, login: bool = True) -> smtplib.SMTP:
        """A connected smtplib client, TLS verified against ``ca_file``, logged in if ``login``."""
        if self.encryption == "tls":
            client: smtplib.SMTP = smtplib.SMTP_SSL(self.host, self.port, context=self.ssl_context(), timeout=30)
        else:
            client = smtplib.SMTP(self.host if self.encryption == "starttls" else self.ip, self.port, timeout=30)
            if self.encryption == "starttls":
                client.starttls(context=self.ssl_context())
        if login:
            client.login(self.username, self.password)
        return client


class _SmtpHandler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, mail_options: list) -> str:
        if self.server.auth_required and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.test_verdict = self.server._decide()
        if envelope.test_verdict and self.server._behaviour.fail_at == "mail":
            return envelope.test_verdict
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list) -> str:
        if address in self.server._behaviour.unknown_recipients:
            return "550 5.1.1 No such user here"
        if address in self.server._behaviour.busy_recipients:
            return "450 4.2.1 Mailbox busy, try again later"
        if 0 < self.server._behaviour.max_recipients <= len(envelope.rcpt_tos):
            return "452 4.5.3 Too many recipients"
        verdict = getattr(envelope, "test_verdict", None)
        if verdict and self.server._behaviour.fail_at == "rcpt":
            return verdict
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        verdict = getattr(envelope, "test_verdict", None)
        if verdict:
            return verdict
        self.server._record(
            ReceivedMessage(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content or envelope.content),
                auth_login=session.auth_data if session.authenticated else None,
                tls=server.transport.get_extra_info("ssl_object") is not None,
            )
        )
        if self.server._behaviour.silent_after_data:
            # Stored, and the reply that would say so is late (or never arrives): the client cannot know.
            await asyncio.sleep(self.server._behaviour.silent_after_data)
        return "250 2.0.0 Message accepted"


class _OAuth2SmtpHandler(_SmtpHandler):
    """Also accepts AUTH XOAUTH2 and OAUTHBEARER, checking the bearer token by introspection."""

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> Any:
        return await self._bearer(server, args)

    async def auth_OAUTHBEARER(self, server: Any, args: list[str]) -> Any:
        return await self._bearer(server, args)

    async def _bearer(self, server: Any, args: list[str]) -> Any:
        from aiosmtpd.smtp import AuthResult

        if len(args) < 2:
            return AuthResult(success=False, handled=False)
        try:
            fields = base64.b64decode(args[1], validate=True).decode().split("\x01")
        except ValueError:
            return AuthResult(success=False, handled=False)
        user = token = None
        for item in fields:
            if item.startswith("user="):
                user = item[5:]
            elif item.startswith("n,a="):  # OAUTHBEARER's GS2 header
                user = item[4:].rstrip(",").replace("=2C", ",").replace("=3D", "=")
            elif item.startswith("auth=Bearer "):
                token = item[12:]
        assert self.server.introspect is not None
        answer = await asyncio.to_thread(self.server.introspect, token or "")
        if not (user and answer.get("active") and answer.get("username") == user):
            return AuthResult(success=False, handled=False)
        self.server.oauth2_logins.append(args[0].upper())
        return AuthResult(success=True, auth_data=user)


@pytest.fixture
def smtp_server(mail_tls: TlsFiles) -> Iterator[Callable[..., SmtpServer]]:
    """Factory: ``smtp_server("starttls" | "tls" | "none", auth_required=..., temp_failures=N,
    reject=False, fail_at="data", unknown_recipients=(), silent_after_data=0)``; every server
    stops after the test.

    ``auth_required`` defaults to True with TLS and False for "none" (where AUTH is still offered).
    """
    started: list[SmtpServer] = []

    def factory(
        encryption: Encryption = "starttls",
        *,
        auth_required: bool | None = None,
        temp_failures: int = 0,
        reject: bool = False,
        fail_at: FailStage = "data",
        unknown_recipients: Iterable[str] = (),
        username: str = "smtp-user",
        password: str | None = None,
        silent_after_data: float = 0.0,
        max_recipients: int = 0,
        busy_recipients: Iterable[str] = (),
        introspect: Callable[[str], dict] | None = None,
        oauth2_mechanisms: tuple[str, ...] = OAUTH2_MECHANISMS,
    ) -> SmtpServer:
        server = SmtpServer(
            mail_tls,
            encryption,
            auth_required=encryption != "none" if auth_required is None else auth_required,
            username=username,
            password=password or secrets.token_urlsafe(12),
            behaviour=_Behaviour(
                temp_failures,
                reject,
                fail_at,
                set(unknown_recipients),
                silent_after_data,
                max_recipients,
                set(busy_recipients),
            ),
            introspect=introspect,
            oauth2_mechanisms=oauth2_mechanisms,
        )
        server.start()
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            server.stop()


class ScriptedImapServer:
    """An IMAP server on 127.0.0.1 for one connection, for what Dovecot cannot be made to do.

    ``answer(tag, command)`` gives the bytes to send for each command line (its verb upper-cased);
    ``b""`` says nothing, as a stalled server would. It stops after LOGOUT or a hang-up. The
    lines received so far are in ``lines`` (the last one is the command being answered).
    """

    def __init__(self, answer: Callable[[bytes, bytes], bytes], greeting: bytes = b"* OK [CAPABILITY IMAP4rev1] ready"):
        self.answer, self.greeting = answer, greeting
        self.lines: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(self.greeting + b"\r\n")
            while line := lines.readline():
                self.lines.append(line.rstrip(b"\r\n"))
                tag, command = line.split()[0], line.split()[1].upper()
                if reply := self.answer(tag, command):
                    conn.sendall(reply)
                if command == b"LOGOUT":
                    return

    def close(self) -> None:
        self.listener.close()


class ScriptedPop3Server:
    """A POP3 server on 127.0.0.1 for one connection, for what Dovecot cannot be made to show.

    ``messages`` are sent for RETR exactly as given, between the "+OK" and the final ".", so a
    test chooses line lengths, line ends and dot-stuffing. Any USER and PASS are accepted; UIDL
    lists ``uidl-1``, ``uidl-2``, ...; LIST each message's length, or ``listed_sizes`` for a server
    whose LIST is wrong; TOP n 0 a message's lines up to its first empty one when ``top`` (TOP is
    optional); other commands get -ERR. ``commands`` records what came.
    """

    def __init__(self, messages: list[bytes], *, listed_sizes: list[int] | None = None, top: bool = False) -> None:
        self.messages = messages
        self.listed_sizes = [len(m) for m in messages] if listed_sizes is None else listed_sizes
        self.top = top
        self.commands: list[bytes] = []
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _answer(self, verb: bytes, argument: bytes) -> bytes:
        if verb in (b"USER", b"PASS", b"QUIT"):
            return b"+OK\r\n"
        if verb == b"UIDL":
            listing = b"".join(b"%d uidl-%d\r\n" % (n, n) for n in range(1, len(self.messages) + 1))
            return b"+OK\r\n" + listing + b".\r\n"
        if verb == b"LIST":
            listing = b"".join(b"%d %d\r\n" % (n, size) for n, size in enumerate(self.listed_sizes, 1))
            return b"+OK\r\n" + listing + b".\r\n"
        if verb == b"RETR" and argument.isdigit() and 1 <= int(argument) <= len(self.messages):
            return b"+OK message follows\r\n" + self.messages[int(argument) - 1] + b".\r\n"
        number, _, lines = argument.partition(b" ")
        if (
            verb == b"TOP"
            and self.top
            and lines == b"0"
            and number.isdigit()
            and 1 <= int(number) <= len(self.messages)
        ):
            head = re.split(rb"(?<=\n)\r?\n", self.messages[int(number) - 1], maxsplit=1)[0]
            return b"+OK top of message follows\r\n" + head + b"\r\n.\r\n"
        return b"-ERR not here\r\n"

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"+OK scripted POP3 ready\r\n")
            while line := lines.readline():
                self.commands.append(line.rstrip(b"\r\n"))
                verb, _, argument = line.strip().partition(b" ")
                conn.sendall(self._answer(verb.upper(), argument))
                if verb.upper() == b"QUIT":
                    return

    def close(self) -> None:
        self.listener.close()


class CapabilityHidingProxy:
    """A plain-text TCP proxy to an IMAP (or POP3) server that hides some of its capabilities.

    For servers unlike Dovecot, which always offers AUTH=PLAIN beside LOGIN (its LOGIN is PLAIN
    inside). Every connection goes to ``port`` on 127.0.0.1; what the client sends passes
    unchanged and is kept in ``sent``; the server's lines lose the capabilities in ``hide``.
    """

    def __init__(self, port: int, hide: Iterable[str]) -> None:
        self.target = port
        self.hide = re.compile(rb"(?i) (?:" + b"|".join(re.escape(c.encode()) for c in hide) + rb")(?=[ \]\r])")
        self.sent: list[bytes] = []
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection((LOOPBACK, self.target))
            threading.Thread(target=self._to_server, args=(client, server), daemon=True).start()
            threading.Thread(target=self._to_client, args=(server, client), daemon=True).start()

    def _to_server(self, client: socket.socket, server: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                self.sent.append(data)
                self._client_sent(data)
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _client_sent(self, data: bytes) -> None:
        """What the client sent, before it goes on to the server."""

    def _to_client(self, server: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError), server.makefile("rb") as lines:
            while line := lines.readline():
                client.sendall(self.hide.sub(b"", line) if b"CAPABILITY" in line.upper() else line)
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.listener.close()


class AnswerLosingProxy(CapabilityHidingProxy):
    """A plain-text proxy to an IMAP server that loses the server's answer to the first ``command``.

    The command reaches the server and is carried out; where its tagged answer would come, the
    proxy closes the connection, as a network failure or a timeout leaves a client not knowing.
    Later connections pass everything.
    """

    def __init__(self, port: int, command: bytes) -> None:
        super().__init__(port, hide=["X-NOTHING-HIDDEN"])
        self.command = command.upper()
        self.tag: bytes | None = None
        self.lost = threading.Event()

    def _client_sent(self, data: bytes) -> None:
        if self.tag is None and not self.lost.is_set():
            found = re.search(rb"(?m)^(\S+) " + re.escape(self.command) + rb" ", data.upper())
            if found:
                self.tag = found.group(1)

    def _to_client(self, server: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError), server.makefile("rb") as lines:
            while line := lines.readline():
                if self.tag is not None and not self.lost.is_set() and line.upper().startswith(self.tag + b" "):
                    self.lost.set()
                    break
                client.sendall(line)
        for sock in (client, server):
            # shutdown first: close alone leaves the socket open while the other thread reads it.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
