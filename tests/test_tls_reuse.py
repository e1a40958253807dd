"""Connections to a mail server reuse what TLS allows: one verifying context, the server's session.

A sync with nothing to do is mostly connection set-up; these show the second connection to a
server resumes the first one's TLS session, that a session is offered only to the host name it
was verified for, and that a replaced CA file is read again.
"""

from __future__ import annotations

import os
import shutil
import ssl
from pathlib import Path

import pytest
from helpers import TEST_DESTINATIONS
from mailservers import Dovecot, MailUser, make_tls_files

from email_service.protocols.errors import ConnectionFailed
from email_service.protocols.imap import ImapSession
from email_service.protocols.pop3 import Pop3Session
from email_service.protocols.smtp import SmtpSession
from email_service.protocols.tls import client_context, sessions


def reused(session) -> bool:
    sock = session.conn.sock
    assert isinstance(sock, ssl.SSLSocket)
    return sock.session_reused


@pytest.mark.parametrize(("session_type", "port"), [(ImapSession, "imaps_port"), (Pop3Session, "pop3s_port")])
def test_the_second_connection_to_a_server_resumes_its_tls_session(
    dovecot: Dovecot, mail_user: MailUser, session_type, port
) -> None:
    sessions.clear()
    options = {"ca_file": Path(dovecot.ca_file), "timeout": 10, "destinations": TEST_DESTINATIONS}
    connect = lambda: session_type(  # noqa: E731
        dovecot.host, getattr(dovecot, port), "tls", mail_user.name, mail_user.password, **options
    )
    with connect() as first:
        assert not reused(first)
    for _ in range(2):
        with connect() as again:
            assert reused(again)


def test_smtp_over_implicit_tls_resumes_too(smtp_server) -> None:
    sessions.clear()
    server = smtp_server("tls")
    options = {"ca_file": Path(server.ca_file), "timeout": 10, "destinations": TEST_DESTINATIONS}
    with SmtpSession(server.host, server.port, "tls", server.username, server.password, **options) as first:
        assert not reused(first)
    with SmtpSession(server.host, server.port, "tls", server.username, server.password, **options) as again:
        assert reused(again)


def test_a_session_is_offered_only_to_the_name_it_was_verified_for(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path
) -> None:
    sessions.clear()
    options = {"ca_file": Path(dovecot.ca_file), "timeout": 10, "destinations": TEST_DESTINATIONS}
    with ImapSession(dovecot.host, dovecot.imaps_port, "tls", mail_user.name, mail_user.password, **options):
        pass
    # The same server by its address: a full handshake, with the certificate checked for that name.
    with ImapSession(dovecot.ip, dovecot.imaps_port, "tls", mail_user.name, mail_user.password, **options) as other:
        assert not reused(other)
    # A CA that does not sign the server's certificate: no session from the trusted context is
    # offered, so verification runs and fails.
    untrusting = {**options, "ca_file": Path(make_tls_files(tmp_path).ca_file)}
    refused = ImapSession(dovecot.host, dovecot.imaps_port, "tls", mail_user.name, mail_user.password, **untrusting)
    with pytest.raises(ConnectionFailed, match="certificate verify failed"), refused:
        pass


def test_one_context_per_ca_file_until_the_file_changes(dovecot: Dovecot, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    shutil.copy(dovecot.ca_file, ca)
    first = client_context(ca)
    assert client_context(ca) is first
    stat = ca.stat()
    os.utime(ca, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert client_context(ca) is not first
