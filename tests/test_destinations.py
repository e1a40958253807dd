"""Hostile destinations, tried as a tenant would: the service must not become a door into its network.

A deployment of its own (API and worker processes on a private PostgreSQL and Redis) allows
exactly two non-public destinations: the test Dovecot's IMAPS port by the name ``localhost``, and
one port on 127.0.0.1 where a server speaking another protocol (NATS) listens. A second listener
on 127.0.0.1 is allowed nowhere; it counts the connections it accepts, which must stay 0.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
from helpers import ServiceProcess, User, base_settings, free_port, service_env
from mailservers import Dovecot, MailUser, make_tls_files

from email_service import embedded, migrate
from email_service.api.auth import TokenVerifier
from email_service.config import ConfigError, load_settings
from email_service.protocols.destinations import DestinationPolicy, DestinationRefused, parse_allowed, resolve
from email_service.protocols.errors import AuthenticationFailed, ConnectionFailed
from email_service.protocols.imap import ImapSession
from email_service.protocols.pop3 import Pop3Session
from email_service.protocols.smtp import PermanentDeliveryError, SmtpSession
from email_service.runtime import Runtime
from email_service.services.accounts import create_account

NATS_BANNER = b'INFO {"server_id":"NDSECRETSERVERID","version":"2.10.7","auth_required":true}\r\n'

# Ways of writing a loopback, unspecified, metadata or other internal address that resolvers accept.
LOOPBACK_SPELLINGS = ["127.0.0.1", "0", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "localhost", "127.0.0.2"]
INTERNAL = [
    "169.254.169.254",  # cloud metadata (link-local)
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",  # carrier-grade NAT
    "224.0.0.1",  # multicast
    "0.0.0.0",  # noqa: S104 - a destination to refuse, nothing binds to it
    "255.255.255.255",
    "240.0.0.1",  # reserved
    "192.0.2.1",  # documentation
    "198.18.0.1",  # benchmarking
]


class Listener:
    """A TCP server on 127.0.0.1 that counts connections and greets each with ``banner``."""

    def __init__(self, banner: bytes, reply: bytes = b"") -> None:
        self.banner, self.reply = banner, reply
        self.accepted = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                conn.sendall(self.banner)
                while self.reply and conn.recv(4096):
                    conn.sendall(self.reply)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def hidden() -> Iterator[Listener]:
    """An internal service nobody allowed: reaching it in any way is the attack."""
    listener = Listener(NATS_BANNER)
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def foreign() -> Iterator[Listener]:
    """Another protocol on a port the operator did allow (as if it were a mail server)."""
    listener = Listener(NATS_BANNER, reply=b"-ERR 'Unknown Protocol Operation'\r\n")
    yield listener
    listener.close()


@dataclass
class Deployment:
    api: ServiceProcess
    worker_log: Path
    runtime: Runtime
    dovecot: Dovecot

    def user(self) -> User:
        return User(TokenVerifier.from_settings(self.runtime.settings))

    def post(self, user: User, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.api.url + path, json=body, headers=user.headers, timeout=30)

    def get(self, user: User, path: str) -> httpx.Response:
        return httpx.get(self.api.url + path, headers=user.headers, timeout=30)

    def put(self, user: User, path: str, body: dict) -> httpx.Response:
        return httpx.put(self.api.url + path, json=body, headers=user.headers, timeout=30)

    def stored_account(self, user: User, **fields: object) -> str:
        """An account saved while the operator still allowed every address (a wider, older policy)."""
        body = account(self.dovecot, None, **fields)
        wide = DestinationPolicy(parse_allowed("0.0.0.0/0,::/0"))
        return create_account(self.runtime.db, self.runtime.cipher, user.principal, body, wide).id

    def task(self, user: User, task_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.get(user, f"/api/sync/task/{task_id}").json()
            if status["status"] in ("success", "failure"):
                return status
            time.sleep(0.2)
        raise AssertionError(f"task not finished: {status}")

    def sync(self, user: User, account_id: str) -> dict:
        started = self.post(user, f"/api/sync/{account_id}", {})
        assert started.status_code == 202, started.text
        return self.task(user, started.json()["taskId"])


def account(dovecot: Dovecot, mail_user: MailUser | None, **fields: object) -> dict:
    body = {
        "accountName": "Probe",
        "emailAddress": f"probe-{uuid.uuid4().hex[:10]}@example.com",
        "protocol": "imap",
        "hostname": dovecot.host,
        "port": dovecot.imaps_port,
        "encryption": "tls",
        "username": mail_user.name if mail_user else "probe",
        "password": mail_user.password if mail_user else "probe-password",
        "isSyncEnabled": False,
    }
    body.update(fields)
    return body


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, dovecot, foreign) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp("destinations")
    allowed = f"localhost:{dovecot.imaps_port},127.0.0.1:{foreign.port}"
    with embedded.services(base_settings(directory)) as started:
        settings = replace(started, destinations=DestinationPolicy(parse_allowed(allowed)))
        migrate.upgrade(settings.database_url, settings.db_app_role)
        env = service_env(
            settings,
            EMAIL_SERVICE_ALLOWED_DESTINATIONS=allowed,
            EMAIL_SERVICE_CA_FILE=str(dovecot.ca_file),
            EMAIL_SERVICE_DATA_DIR=str(directory),
            EMAIL_SERVICE_STORAGE_KEY=settings.storage_signing_key,
            EMAIL_SERVICE_RATE_LIMITS="false",
        )
        runtime = Runtime.build(settings)
        api = ServiceProcess(env, directory)
        worker_log = directory / "worker.log"
        with worker_log.open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "email_service", "worker", "--no-scheduler"], env=env, stdout=log, stderr=log
            )
        try:
            api.wait_healthy()
            yield Deployment(api, worker_log, runtime, dovecot)
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
            api.stop()
            runtime.close()


# ---- the policy itself, on real resolution


@pytest.mark.parametrize("host", [*LOOPBACK_SPELLINGS, *INTERNAL, "::1", "[::1]", "::ffff:127.0.0.1", "fe80::1"])
def test_every_spelling_of_an_internal_address_is_refused_after_resolution(host):
    with pytest.raises(DestinationRefused) as refused:
        resolve(host, 993, DestinationPolicy())
    assert str(refused.value).startswith(f"destination not allowed: {host}:993")


@pytest.mark.parametrize(
    "host",
    [
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "fc00::1",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "::",
    ],
)
def test_ipv6_forms_that_reach_internal_networks_are_refused(host):
    with pytest.raises(DestinationRefused):
        resolve(host, 993, DestinationPolicy())


def test_public_addresses_pass_and_allow_list_entries_open_only_what_they_name():
    assert resolve("8.8.8.8", 993, DestinationPolicy()) == [(socket.AF_INET, ("8.8.8.8", 993))]
    assert resolve("64:ff9b::808:808", 993, DestinationPolicy())  # NAT64 of a public address
    policy = DestinationPolicy(parse_allowed("localhost:993,10.1.0.0/16"))
    assert resolve("localhost", 993, policy) == [(socket.AF_INET, ("127.0.0.1", 993))]
    assert resolve("10.1.2.3", 4222, policy) == [(socket.AF_INET, ("10.1.2.3", 4222))]
    for host, port in [("localhost", 994), ("127.0.0.1", 993), ("127.1", 993), ("10.2.0.1", 993)]:
        with pytest.raises(DestinationRefused):
            resolve(host, port, policy)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("127.1", "write IPv4 addresses as four decimal numbers"),
        ("127.0.0.01", "is not a valid IP address or network"),
        ("10.0.0.1/8", "host bits set"),
        ("mail.internal:0", "port must be a number from 1 to 65535"),
        ("[fd00::1", "write an IPv6 entry as [ADDRESS] or [ADDRESS]:PORT"),
        ("a host", "is not a host name, IP address or network"),
    ],
)
def test_a_bad_allow_list_stops_start_up_with_one_line(raw, fragment, tmp_path):
    with pytest.raises(ConfigError) as error:
        load_settings({"EMAIL_SERVICE_ALLOWED_DESTINATIONS": raw, "EMAIL_SERVICE_DATA_DIR": str(tmp_path)})
    message = str(error.value)
    assert message.startswith("EMAIL_SERVICE_ALLOWED_DESTINATIONS: ") and fragment in message and "\n" not in message


def test_a_bad_allow_list_is_refused_by_the_command_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "email_service", "serve", "--port", str(free_port())],
        # Otherwise complete settings, with servers that do not exist: only the allow-list can fail.
        env=service_env(
            base_settings(tmp_path, database_url="postgresql://127.0.0.1:9/none", redis_url="redis://127.0.0.1:9"),
            EMAIL_SERVICE_ALLOWED_DESTINATIONS="0x7f000001",
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "EMAIL_SERVICE_ALLOWED_DESTINATIONS: '0x7f000001': write IPv4 addresses as four" in done.stderr
    assert "Traceback" not in done.stderr


# ---- through the running API


@pytest.mark.parametrize("host", [*LOOPBACK_SPELLINGS, *INTERNAL])
def test_creating_an_account_on_an_internal_address_is_400_naming_the_field(deployment, hidden, host):
    user = deployment.user()
    for field, port_field in (("hostname", "port"), ("smtpHostname", "smtpPort")):
        response = deployment.post(
            user, "/api/accounts", account(deployment.dovecot, None, **{field: host, port_field: hidden.port})
        )
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["code"] == "DESTINATION_NOT_ALLOWED"
        assert body["message"].startswith(f"{field} {host}:{hidden.port} is not allowed")
    assert deployment.get(user, "/api/accounts").json()["pagination"]["total"] == 0
    assert hidden.accepted == 0


@pytest.mark.parametrize("host", ["::1", "[::1]", "::ffff:127.0.0.1", "fe80::1%eth0"])
def test_ipv6_literals_are_refused_by_the_schema(deployment, host):
    user = deployment.user()
    response = deployment.post(user, "/api/accounts", account(deployment.dovecot, None, hostname=host))
    assert response.status_code == 400, response.text
    assert deployment.get(user, "/api/accounts").json()["pagination"]["total"] == 0


def test_updating_an_account_to_an_internal_address_is_400_and_changes_nothing(deployment, hidden):
    user = deployment.user()
    created = deployment.post(user, "/api/accounts", account(deployment.dovecot, None))
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    for change in (
        {"hostname": "169.254.169.254"},
        {"port": hidden.port},  # the allowed name, on a port nobody allowed
        {"smtpHostname": "2130706433", "smtpPort": hidden.port},
    ):
        response = deployment.put(user, f"/api/accounts/{account_id}", change)
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "DESTINATION_NOT_ALLOWED"
    stored = deployment.get(user, f"/api/accounts/{account_id}").json()
    assert (stored["hostname"], stored["port"]) == ("localhost", deployment.dovecot.imaps_port)
    renamed = deployment.put(user, f"/api/accounts/{account_id}", {"accountName": "Renamed"})
    assert renamed.status_code == 200, renamed.text
    assert hidden.accepted == 0


def test_an_allowed_name_syncs_with_its_certificate_checked_against_that_name(deployment, dovecot, mail_user):
    user = deployment.user()
    created = deployment.post(user, "/api/accounts", account(dovecot, mail_user))
    assert created.status_code == 201, created.text
    status = deployment.sync(user, created.json()["id"])
    assert status["status"] == "success", status
    # The same server by its address is not what the operator allowed.
    response = deployment.post(user, "/api/accounts", account(dovecot, mail_user, hostname="127.0.0.1"))
    assert response.status_code == 400 and response.json()["code"] == "DESTINATION_NOT_ALLOWED"


# ---- through the worker: stored accounts are checked again before every connection


@pytest.mark.parametrize("host", [*LOOPBACK_SPELLINGS, "169.254.169.254"])
@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_a_sync_to_a_refused_destination_fails_and_never_connects(deployment, hidden, host, protocol):
    user = deployment.user()
    account_id = deployment.stored_account(user, hostname=host, port=hidden.port, protocol=protocol, encryption="none")
    status = deployment.sync(user, account_id)
    assert status["status"] == "failure"
    assert status["error"].startswith(f"destination not allowed: {host}:{hidden.port} is not a public address")
    assert hidden.accepted == 0


def test_a_refused_port_reads_the_same_whether_something_listens_or_not(deployment, hidden):
    user = deployment.user()
    closed = free_port()
    errors = []
    for port in (hidden.port, closed):
        account_id = deployment.stored_account(user, hostname="127.0.0.1", port=port, encryption="none")
        errors.append(deployment.sync(user, account_id)["error"].replace(str(port), "PORT"))
    assert errors[0] == errors[1]
    assert hidden.accepted == 0


def test_sending_through_a_refused_smtp_destination_fails_without_connecting(deployment, hidden, dovecot, mail_user):
    user = deployment.user()
    account_id = deployment.stored_account(
        user,
        username=mail_user.name,
        password=mail_user.password,
        smtpHostname="0x7f000001",
        smtpPort=hidden.port,
        smtpEncryption="none",
    )
    assert deployment.sync(user, account_id)["status"] == "success"
    body = {"accountId": account_id, "to": ["bob@example.org"], "subject": "Probe", "body": "Hi"}
    sent = deployment.post(user, "/api/compose/send", body)
    assert sent.status_code == 202, sent.text
    status = deployment.task(user, sent.json()["taskId"])
    assert status["status"] == "failure"
    assert status["error"].startswith(f"destination not allowed: 0x7f000001:{hidden.port}")
    message = deployment.get(user, f"/api/{account_id}/messages/{sent.json()['messageId']}").json()
    assert message["deliveryStatus"] == "failed"
    assert hidden.accepted == 0


# ---- a server that answers in another protocol: contacted, never quoted


@pytest.mark.parametrize(("protocol", "name"), [("imap", "an IMAP"), ("pop3", "a POP3")])
def test_a_foreign_banner_on_an_allowed_port_is_not_echoed(deployment, foreign, protocol, name):
    user = deployment.user()
    before = foreign.accepted
    created = deployment.post(
        user,
        "/api/accounts",
        account(
            deployment.dovecot, None, hostname="127.0.0.1", port=foreign.port, protocol=protocol, encryption="none"
        ),
    )
    assert created.status_code == 201, created.text
    status = deployment.sync(user, created.json()["id"])
    assert status == {
        **status,
        "status": "failure",
        "error": f"127.0.0.1:{foreign.port} did not answer as {name} server",
    }
    assert foreign.accepted > before  # it really was asked
    assert "SECRETSERVERID" not in deployment.worker_log.read_text(errors="replace")
    assert "SECRETSERVERID" not in deployment.api.log()


def test_a_foreign_banner_on_an_smtp_port_is_not_echoed(foreign):
    policy = DestinationPolicy(parse_allowed(f"127.0.0.1:{foreign.port}"))
    session = SmtpSession("127.0.0.1", foreign.port, "none", "user", "secret", timeout=5, destinations=policy)
    with pytest.raises(PermanentDeliveryError) as failure, session:
        pass
    assert str(failure.value) == f"127.0.0.1:{foreign.port} did not answer as an SMTP server"


# ---- TLS is checked against the name the user gave, not the address that was checked


class ScriptedTlsServer:
    """IMAP or POP3 over TLS that refuses every login, recording the SNI name each client sent."""

    def __init__(self, context, protocol: str) -> None:
        self.protocol = protocol
        self.sni: list[str | None] = []
        context.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self._talk(tls.makefile("rwb"))
            except (OSError, ValueError):
                pass

    def _talk(self, stream) -> None:
        if self.protocol == "pop3":
            stream.write(b"+OK ready\r\n")
            stream.flush()
            while line := stream.readline():
                stream.write(b"+OK\r\n" if line.startswith(b"USER") else b"-ERR [AUTH] no\r\n")
                stream.flush()
            return
        stream.write(b"* OK ready\r\n")
        stream.flush()
        while line := stream.readline():
            tag, _, command = line.partition(b" ")
            if command.upper().startswith(b"CAPABILITY"):
                stream.write(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
            else:
                stream.write(tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
            stream.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.mark.parametrize(("protocol", "session_type"), [("imap", ImapSession), ("pop3", Pop3Session)])
def test_tls_verifies_the_host_name_and_sends_it_as_sni(tmp_path, protocol, session_type):
    tls = make_tls_files(tmp_path, ip_san=False)  # valid for "localhost" only, not for 127.0.0.1
    server = ScriptedTlsServer(tls.server_context(), protocol)
    policy = DestinationPolicy(parse_allowed(f"127.0.0.1:{server.port}"))
    try:
        options = {"ca_file": Path(tls.ca_file), "timeout": 5, "destinations": policy}
        # "localhost" resolves to the allowed 127.0.0.1, and the certificate is checked for "localhost".
        with pytest.raises(AuthenticationFailed), session_type("localhost", server.port, "tls", "u", "p", **options):
            pass
        assert server.sni == ["localhost"]
        # The same address by its number: the certificate does not name it, so TLS fails.
        by_number = session_type("127.0.0.1", server.port, "tls", "u", "p", **options)
        with pytest.raises(ConnectionFailed, match="certificate verify failed"), by_number:
            pass
    finally:
        server.close()
