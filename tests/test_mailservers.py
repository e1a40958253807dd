"""The mail-server fixtures work as the sync and send tests will rely on, with TLS verified."""

from __future__ import annotations

import contextlib
import datetime as dt
import imaplib
import poplib
import re
import smtplib
import socket
import ssl
import time

import pytest
from mailservers import Dovecot, MailUser, SmtpServer, imap_utf7_decode, imap_utf7_encode, quote_mailbox
from messages import (
    attachments_message,
    html_message,
    international_message,
    malformed_message,
    plain_message,
    realistic_mix,
    thread,
    to_bytes,
)


def fetch_raw(client: imaplib.IMAP4, uid: int) -> bytes:
    typ, data = client.uid("FETCH", str(uid), "(BODY.PEEK[])")
    assert typ == "OK", data
    return data[0][1]


def capabilities(client: imaplib.IMAP4) -> set[str]:
    # imaplib keeps the pre-login list; Dovecot advertises more once logged in.
    typ, data = client.capability()
    assert typ == "OK"
    return set(data[0].decode().upper().split())


# ---------------------------------------------------------------- TLS is real


def test_imap_implicit_tls_verifies_chain_and_host_name(dovecot: Dovecot, mail_user: MailUser) -> None:
    with dovecot.imap(mail_user) as client:
        assert client.state == "AUTH"
        assert client.sock.version() in {"TLSv1.2", "TLSv1.3"}
        cert = client.sock.getpeercert()
        assert ("DNS", "localhost") in cert["subjectAltName"]
        assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]


def test_imap_starttls_verifies(dovecot: Dovecot, mail_user: MailUser) -> None:
    with dovecot.imap(mail_user, starttls=True) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.state == "AUTH"


def test_clients_trusting_only_the_system_store_reject_the_servers(dovecot: Dovecot, smtp_server) -> None:
    system_only = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=system_only, timeout=10)
    client = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(ssl_context=system_only)
    finally:
        # The failed handshake has already closed the socket.
        with contextlib.suppress(OSError):
            client.shutdown()
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=system_only, timeout=10)
    smtp = smtp_server("tls")
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL(smtp.host, smtp.port, context=system_only, timeout=10)


def test_a_host_name_outside_the_certificate_is_rejected(dovecot: Dovecot) -> None:
    # Trusted chain, wrong name: proves check_hostname is in force, not only the chain.
    with (
        socket.create_connection((dovecot.ip, dovecot.imaps_port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"),
    ):
        dovecot.ssl_context().wrap_socket(raw, server_hostname="imap.example.com")
    # The IP address is in the certificate too.
    with socket.create_connection((dovecot.ip, dovecot.imaps_port), timeout=10) as raw:
        dovecot.ssl_context().wrap_socket(raw, server_hostname=dovecot.ip).close()


def test_pop3_over_tls_and_stls(dovecot: Dovecot, mail_user: MailUser) -> None:
    raw = to_bytes(plain_message("pop me"))
    dovecot.append(mail_user, "INBOX", raw)
    for stls in (False, True):
        client = dovecot.pop3(mail_user, stls=stls)
        try:
            assert isinstance(client.sock, ssl.SSLSocket)
            assert client.stat()[0] == 1
            _, lines, _ = client.retr(1)
            assert b"\r\n".join(lines) + b"\r\n" == raw
            _, uidl, _ = client.uidl()
            assert len(uidl) == 1
        finally:
            client.quit()


def test_plain_imap_login_works_for_encryption_none(dovecot: Dovecot, mail_user: MailUser) -> None:
    with imaplib.IMAP4(dovecot.ip, dovecot.imap_port, timeout=10) as client:
        client.login(mail_user.name, mail_user.password)
        assert client.state == "AUTH"


# ---------------------------------------------------------------- users


def test_users_added_while_running_can_log_in(dovecot: Dovecot) -> None:
    first = dovecot.add_user()
    with dovecot.imap(first):
        pass
    second = dovecot.add_user("late.joiner", "s3cret-pass")
    with dovecot.imap(second) as client:
        assert client.state == "AUTH"
    with (
        imaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=dovecot.ssl_context()) as client,
        pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"),
    ):
        client.login(second.name, "wrong password")
    # Each user has a mailbox of their own.
    dovecot.append(first, "INBOX", to_bytes(plain_message()))
    with dovecot.imap(second) as client:
        assert client.select("INBOX") == ("OK", [b"0"])


# ---------------------------------------------------------------- mailboxes


def test_special_use_mailboxes_exist_and_are_subscribed(dovecot: Dovecot, mail_user: MailUser) -> None:
    with dovecot.imap(mail_user) as client:
        typ, data = client.list('""', "*")
        assert typ == "OK"
        attributes = {line.rsplit(b" ", 1)[1].decode(): line for line in data}
        for name, flag in {"Sent": "\\Sent", "Drafts": "\\Drafts", "Junk": "\\Junk", "Trash": "\\Trash"}.items():
            assert flag.encode() in attributes[name]
        typ, data = client._simple_command("LIST", "(SPECIAL-USE)", '""', "*")
        assert typ == "OK"
        special = client._untagged_response(typ, data, "LIST")[1]
        assert len(special) == 4
        typ, data = client.lsub('""', "*")
        assert {line.rsplit(b" ", 1)[1] for line in data} >= {b"Sent", b"Drafts", b"Junk", b"Trash"}
        assert "SPECIAL-USE" in capabilities(client)


def test_non_ascii_folder_in_modified_utf7(dovecot: Dovecot, mail_user: MailUser) -> None:
    name = "Entwürfe/Привет & Co"
    assert imap_utf7_encode(name) == "Entw&APw-rfe/&BB8EQAQ4BDIENQRC- &- Co"
    assert imap_utf7_decode(imap_utf7_encode(name)) == name
    dovecot.create_folder(mail_user, name)
    raw = to_bytes(international_message())
    uid = dovecot.append(mail_user, name, raw)
    with dovecot.imap(mail_user) as client:
        typ, data = client.list('""', "*")
        names = [imap_utf7_decode(re.search(rb'"/" "?(.*?)"?$', line).group(1).decode()) for line in data]
        assert name in names and "Entwürfe" in names
        client.select(quote_mailbox(name), readonly=True)
        assert fetch_raw(client, uid) == raw


def test_condstore_and_qresync(dovecot: Dovecot, mail_user: MailUser) -> None:
    uid = dovecot.append(mail_user, "INBOX", to_bytes(plain_message()))
    with dovecot.imap(mail_user) as client:
        assert {"CONDSTORE", "QRESYNC", "IDLE", "MOVE", "UIDPLUS"} <= capabilities(client)
        typ, data = client.enable("CONDSTORE")
        assert typ == "OK", data
        client.select("INBOX")
        before = int(client.response("HIGHESTMODSEQ")[1][0])
        client.uid("STORE", str(uid), "+FLAGS", r"(\Flagged)")
        typ, data = client.uid("FETCH", str(uid), "(FLAGS MODSEQ)")
        modseq = int(re.search(rb"MODSEQ \((\d+)\)", data[0]).group(1))
        assert modseq > before
        typ, data = client.uid("FETCH", "1:*", f"(FLAGS) (CHANGEDSINCE {before})")
        assert b"\\Flagged" in data[0]
    with dovecot.imap(mail_user) as client:
        assert client.enable("QRESYNC")[0] == "OK"


def test_idle_sees_mail_appended_by_another_client(dovecot: Dovecot, mail_user: MailUser) -> None:
    with dovecot.imap(mail_user) as client:
        client.select("INBOX")
        # imaplib has no IDLE before Python 3.14: speak it by hand.
        tag = client._new_tag()
        client.send(tag + b" IDLE\r\n")
        assert client.readline().startswith(b"+")
        started = time.monotonic()
        dovecot.append(mail_user, "INBOX", to_bytes(plain_message("wake up")))
        client.sock.settimeout(10)
        assert re.match(rb"\* 1 EXISTS", client.readline())
        assert time.monotonic() - started < 5
        client.send(b"DONE\r\n")
        while not (line := client.readline()).startswith(tag):
            assert line.startswith(b"* ")  # e.g. "* 1 RECENT"
        assert line.startswith(tag + b" OK")


def test_append_then_fetch_returns_identical_bytes(dovecot: Dovecot, mail_user: MailUser) -> None:
    samples = {
        "plain": to_bytes(plain_message()),
        "html": to_bytes(html_message()),
        "attachments": to_bytes(attachments_message()),
        "international": to_bytes(international_message()),
        "malformed": malformed_message(),
        **{f"thread{i}": to_bytes(m) for i, m in enumerate(thread(3))},
    }
    when = dt.datetime(2023, 5, 17, 10, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    uids = {
        key: dovecot.append(mail_user, "INBOX", raw, flags=(r"\Seen",), internaldate=when)
        for key, raw in samples.items()
    }
    with dovecot.imap(mail_user) as client:
        client.select("INBOX", readonly=True)
        for key, uid in uids.items():
            assert fetch_raw(client, uid) == samples[key], key
        typ, data = client.uid("FETCH", str(uids["plain"]), "(FLAGS INTERNALDATE RFC822.SIZE)")
        assert b"\\Seen" in data[0]
        # Maildir keeps the instant, not the zone: Dovecot answers in UTC.
        internaldate = re.search(rb'INTERNALDATE "([^"]+)"', data[0]).group(1).decode()
        assert dt.datetime.strptime(internaldate, "%d-%b-%Y %H:%M:%S %z") == when
        assert f"RFC822.SIZE {len(samples['plain'])}".encode() in data[0]


def test_changing_uidvalidity_by_recreating_a_folder(dovecot: Dovecot, mail_user: MailUser) -> None:
    dovecot.create_folder(mail_user, "Projects/2024")
    dovecot.append(mail_user, "Projects/2024", to_bytes(plain_message()))
    before = dovecot.uidvalidity(mail_user, "Projects/2024")
    after = dovecot.recreate_folder(mail_user, "Projects/2024")
    assert after != before
    with dovecot.imap(mail_user) as client:
        assert client.select(quote_mailbox("Projects/2024")) == ("OK", [b"0"])


def test_realistic_mix(dovecot: Dovecot, mail_user: MailUser) -> None:
    mix = list(realistic_mix(60, seed=1))
    assert sum(b"Content-Disposition: attachment" in raw for raw in mix) == 6
    assert len({len(raw) // 1000 for raw in mix}) > 10  # sizes vary
    dovecot.create_folder(mail_user, "Bench")
    uids = dovecot.append_many(mail_user, "Bench", mix)
    assert uids == list(range(1, 61))
    with dovecot.imap(mail_user) as client:
        typ, data = client.status("Bench", "(MESSAGES)")
        assert b"MESSAGES 60" in data[0]


def test_stop_and_start_keep_users_and_mail(dovecot: Dovecot, mail_user: MailUser) -> None:
    raw = to_bytes(plain_message("survives a restart"))
    uid = dovecot.append(mail_user, "INBOX", raw)
    validity = dovecot.uidvalidity(mail_user, "INBOX")
    ports = (dovecot.imap_port, dovecot.imaps_port, dovecot.pop3_port, dovecot.pop3s_port)
    connected = dovecot.imap(mail_user)
    connected.select("INBOX")
    with dovecot.stopped():
        assert not dovecot.running and dovecot.pids() == []
        # A client in the middle of a session loses its connection...
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            connected.noop()
        with contextlib.suppress(OSError):
            connected.shutdown()
        # ...and new ones are refused.
        for port in ports:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((dovecot.ip, port), timeout=5).close()
    assert (dovecot.imap_port, dovecot.imaps_port, dovecot.pop3_port, dovecot.pop3s_port) == ports
    assert dovecot.uidvalidity(mail_user, "INBOX") == validity
    with dovecot.imap(mail_user) as client:
        client.select("INBOX", readonly=True)
        assert fetch_raw(client, uid) == raw


# ---------------------------------------------------------------- SMTP


def send(server: SmtpServer, raw: bytes, *, login: bool = True, to: tuple[str, ...] = ("bob@example.org",)) -> dict:
    with server.client(login=login) as client:
        return client.sendmail("alice@example.com", list(to), raw)


def test_smtp_starttls_with_auth_required(smtp_server) -> None:
    server = smtp_server("starttls")
    raw = to_bytes(attachments_message())
    assert send(server, raw) == {}
    [received] = server.messages
    assert received.mail_from == "alice@example.com"
    assert received.rcpt_tos == ["bob@example.org"]
    assert received.data == raw
    assert received.tls and received.auth_login == server.username

    with (
        pytest.raises(smtplib.SMTPAuthenticationError),
        smtplib.SMTP(server.host, server.port, timeout=10) as client,
    ):
        client.starttls(context=server.ssl_context())
        client.login(server.username, "wrong")
    # Without STARTTLS the server refuses to go on, and without AUTH it refuses mail.
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("alice@example.com", ["bob@example.org"], raw)
        assert refused.value.smtp_code == 530
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send(server, raw, login=False)
    assert refused.value.smtp_code == 530
    assert len(server.messages) == 1


def test_smtp_implicit_tls_with_auth(smtp_server) -> None:
    server = smtp_server("tls")
    raw = to_bytes(international_message())
    with server.client(login=False) as client:
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"].upper()
        assert isinstance(client.sock, ssl.SSLSocket)
    send(server, raw)
    [received] = server.wait_for(1)
    assert received.data == raw and received.tls and received.auth_login == server.username


def test_smtp_plain(smtp_server) -> None:
    server = smtp_server("none")
    raw = to_bytes(plain_message())
    send(server, raw, login=False, to=("bob@example.org", "carol@example.org"))
    [received] = server.messages
    assert received.data == raw
    assert received.rcpt_tos == ["bob@example.org", "carol@example.org"]
    assert not received.tls and received.auth_login is None


def test_smtp_temporary_failure_then_success(smtp_server) -> None:
    server = smtp_server("starttls", temp_failures=2)
    raw = to_bytes(plain_message())
    for _ in range(2):
        with pytest.raises(smtplib.SMTPDataError) as failure:
            send(server, raw)
        assert failure.value.smtp_code == 451
    assert send(server, raw) == {}
    assert server.attempts == 3 and len(server.messages) == 1

    greylisting = smtp_server("tls", temp_failures=1, fail_at="rcpt")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(greylisting, raw)
    assert refused.value.recipients["bob@example.org"][0] == 451
    send(greylisting, raw)
    assert len(greylisting.messages) == 1


def test_smtp_permanent_failures(smtp_server) -> None:
    raw = to_bytes(plain_message())
    server = smtp_server("starttls", reject=True)
    with pytest.raises(smtplib.SMTPDataError) as failure:
        send(server, raw)
    assert failure.value.smtp_code == 550
    assert server.messages == []

    server.reject = False
    server.unknown_recipients.add("nobody@example.org")
    refused = send(server, raw, to=("bob@example.org", "nobody@example.org"))
    assert refused == {"nobody@example.org": (550, b"5.1.1 No such user here")}
    assert server.messages[0].rcpt_tos == ["bob@example.org"]
