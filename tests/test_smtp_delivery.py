"""SmtpSession against real aiosmtpd servers: TLS modes, AUTH, and how failures are classified."""

from __future__ import annotations

import socket
import threading
from datetime import UTC, datetime
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from helpers import TEST_DESTINATIONS
from mailservers import LOOPBACK, SmtpServer, free_port, make_tls_files

from email_service.outgoing.build import build_message, new_message_id, wire_bytes
from email_service.protocols.errors import AuthenticationFailed, MailServerError, reply_line
from email_service.protocols.smtp import (
    AmbiguousDeliveryError,
    PermanentDeliveryError,
    SendOutcome,
    SmtpSession,
    TemporaryDeliveryError,
)

SENDER = "alice@example.com"


def message_bytes(to: list[str], subject: str = "Hello from the service") -> bytes:
    msg = build_message(
        from_address=SENDER,
        from_name="Alice Exämple",
        to=to,
        cc=[],
        reply_to=None,
        subject=subject,
        body="Hi,\n.\nA line with a lone dot above, and ünïcödé.\n",
        is_html=False,
        attachments=[],
        message_id=new_message_id("example.com"),
        date=datetime.now(UTC),
        in_reply_to=None,
    )
    return wire_bytes(msg)


def session(server: SmtpServer, *, password: str | None = None, **kwargs: object) -> SmtpSession:
    options: dict = {"ca_file": Path(server.ca_file), "timeout": 10, "destinations": TEST_DESTINATIONS}
    options.update(kwargs)
    host = server.host if server.encryption != "none" else server.ip
    return SmtpSession(
        host,
        server.port,
        server.encryption,
        server.username,
        server.password if password is None else password,
        **options,
    )


def connect(smtp: SmtpSession) -> None:
    with smtp:
        pass


def test_starttls_with_auth_delivers_exactly_the_wire_bytes(smtp_server) -> None:
    server = smtp_server("starttls")
    data = message_bytes(["bob@example.org"])
    with session(server) as smtp:
        # Bcc recipients travel in the envelope only.
        outcome = smtp.send(SENDER, ["bob@example.org", "hidden@example.net", "bob@example.org"], data)
    assert outcome == SendOutcome(refused={})
    [received] = server.messages
    assert received.data == data
    assert received.mail_from == SENDER
    assert received.rcpt_tos == ["bob@example.org", "hidden@example.net"]
    assert received.tls and received.auth_login == server.username
    assert b"hidden" not in received.data
    assert message_from_bytes(received.data, policy=policy.default)["Subject"] == "Hello from the service"


def test_one_session_sends_several_messages(smtp_server) -> None:
    server = smtp_server("starttls")
    with session(server) as smtp:
        for i in range(3):
            smtp.send(SENDER, ["bob@example.org"], message_bytes(["bob@example.org"], f"message {i}"))
    assert len(server.messages) == 3


def test_implicit_tls_with_auth(smtp_server) -> None:
    server = smtp_server("tls")
    data = message_bytes(["bob@example.org"])
    with session(server) as smtp:
        smtp.send(SENDER, ["bob@example.org"], data)
    [received] = server.wait_for(1)
    assert received.data == data and received.tls and received.auth_login == server.username


def test_plain_mode_with_and_without_credentials(smtp_server) -> None:
    server = smtp_server("none")
    data = message_bytes(["bob@example.org"])
    with session(server) as smtp:
        smtp.send(SENDER, ["bob@example.org", "carol@example.org"], data)
    with session(server, password="") as smtp:
        smtp.send(SENDER, ["bob@example.org"], data)
    first, second = server.messages
    assert first.data == data and not first.tls and first.auth_login == server.username
    assert first.rcpt_tos == ["bob@example.org", "carol@example.org"]
    assert second.auth_login is None


def test_non_ascii_password_is_sent_as_utf8(smtp_server) -> None:
    server = smtp_server("starttls", password="pässwörd-ß-€")
    with session(server) as smtp:
        smtp.send(SENDER, ["bob@example.org"], message_bytes(["bob@example.org"]))
    assert server.messages[0].auth_login == server.username


def test_idn_envelope_domains_are_sent_as_a_labels(smtp_server) -> None:
    server = smtp_server("starttls")
    with session(server) as smtp:
        smtp.send("zoe@exämple.net", ["bob@bücher.example"], message_bytes(["bob@bücher.example"]))
    assert server.messages[0].mail_from == "zoe@xn--exmple-cua.net"
    assert server.messages[0].rcpt_tos == ["bob@xn--bcher-kva.example"]


@pytest.mark.parametrize("encryption", ["starttls", "tls"])
def test_wrong_password_is_permanent(smtp_server, encryption: str) -> None:
    server = smtp_server(encryption)
    with pytest.raises(PermanentDeliveryError) as failure, session(server, password="wrong-secret"):
        pass
    message = str(failure.value)
    assert message.startswith(f"authentication failed for {server.username} at {server.host}")
    assert "535" in message
    assert "wrong-secret" not in message and server.password not in message
    assert isinstance(failure.value, AuthenticationFailed)
    assert failure.value.code == 535


def test_451_is_temporary_and_a_retry_succeeds(smtp_server) -> None:
    server = smtp_server("starttls", temp_failures=2)
    data = message_bytes(["bob@example.org"])
    with session(server) as smtp:
        with pytest.raises(TemporaryDeliveryError, match=r"451 4\.7\.1 Temporary failure") as failure:
            smtp.send(SENDER, ["bob@example.org"], data)
        assert failure.value.code == 451
    # A new session, as a retrying job would open.
    with session(server) as smtp, pytest.raises(TemporaryDeliveryError):
        smtp.send(SENDER, ["bob@example.org"], data)
    assert server.messages == []
    with session(server) as smtp:
        assert smtp.send(SENDER, ["bob@example.org"], data).refused == {}
    assert server.attempts == 3 and [m.data for m in server.messages] == [data]


@pytest.mark.parametrize("fail_at", ["mail", "rcpt"])
def test_451_at_mail_or_rcpt_is_temporary(smtp_server, fail_at: str) -> None:
    server = smtp_server("tls", temp_failures=1, fail_at=fail_at)
    data = message_bytes(["bob@example.org"])
    with session(server) as smtp:
        with pytest.raises(TemporaryDeliveryError, match="451"):
            smtp.send(SENDER, ["bob@example.org"], data)
        # The failed transaction was reset; the same session can go on.
        smtp.send(SENDER, ["bob@example.org"], data)
    assert len(server.messages) == 1


@pytest.mark.parametrize("fail_at", ["mail", "rcpt", "data"])
def test_550_is_permanent_with_the_server_reply(smtp_server, fail_at: str) -> None:
    server = smtp_server("starttls", reject=True, fail_at=fail_at)
    with session(server) as smtp, pytest.raises(PermanentDeliveryError) as failure:
        smtp.send(SENDER, ["bob@example.org"], message_bytes(["bob@example.org"]))
    assert "550 5.7.1 Message rejected by test server" in str(failure.value)
    assert failure.value.code == 550
    assert server.password not in str(failure.value)
    assert server.messages == []


def test_partial_refusal_is_reported(smtp_server) -> None:
    server = smtp_server("starttls", unknown_recipients=["nobody@example.org", "ghost@example.org"])
    data = message_bytes(["bob@example.org", "nobody@example.org"])
    with session(server) as smtp:
        outcome = smtp.send(SENDER, ["bob@example.org", "nobody@example.org", "ghost@example.org"], data)
    assert outcome.refused == {
        "nobody@example.org": (550, "5.1.1 No such user here"),
        "ghost@example.org": (550, "5.1.1 No such user here"),
    }
    [received] = server.messages
    assert received.rcpt_tos == ["bob@example.org"] and received.data == data


def test_recipients_beyond_a_servers_limit_get_the_message_in_further_transactions(smtp_server) -> None:
    # RFC 5321 4.5.3.1.10: a server with a limit of recipients per message says 452 to the rest,
    # which the client sends in another transaction; nobody gets the message twice.
    server = smtp_server("starttls", max_recipients=3)
    recipients = [f"r{n}@example.org" for n in range(7)]
    data = message_bytes(recipients)
    with session(server) as smtp:
        outcome = smtp.send(SENDER, recipients, data)
    assert outcome.refused == {}
    assert [m.rcpt_tos for m in server.messages] == [recipients[0:3], recipients[3:6], recipients[6:7]]
    assert all(m.data == data for m in server.messages)


def test_a_recipient_still_busy_in_the_next_transaction_is_reported_not_reached(smtp_server) -> None:
    server = smtp_server("starttls", busy_recipients=["busy@example.org"], unknown_recipients=["nobody@example.org"])
    recipients = ["bob@example.org", "busy@example.org", "nobody@example.org"]
    with session(server) as smtp:
        outcome = smtp.send(SENDER, recipients, message_bytes(recipients))
    assert outcome.refused == {
        "busy@example.org": (450, "4.2.1 Mailbox busy, try again later"),
        "nobody@example.org": (550, "5.1.1 No such user here"),
    }
    # Tried once more on its own; the message went out once, to the one who takes it.
    assert [m.rcpt_tos for m in server.messages] == [["bob@example.org"]]
    assert server.attempts == 2


def test_all_recipients_refused_is_permanent(smtp_server) -> None:
    server = smtp_server("starttls", unknown_recipients=["nobody@example.org"])
    with session(server) as smtp, pytest.raises(PermanentDeliveryError) as failure:
        smtp.send(SENDER, ["nobody@example.org"], message_bytes(["nobody@example.org"]))
    assert "nobody@example.org: 550 5.1.1 No such user here" in str(failure.value)
    assert server.messages == []


def test_untrusted_certificate_is_permanent(smtp_server, tmp_path: Path) -> None:
    other_ca = Path(make_tls_files(tmp_path).ca_file)
    for encryption in ("starttls", "tls"):
        server = smtp_server(encryption)
        for ca_file in (None, other_ca):  # the system store, and a CA that signed something else
            with pytest.raises(PermanentDeliveryError, match="certificate verify failed") as failure:
                connect(session(server, ca_file=ca_file))
            assert f"{server.host}:{server.port}" in str(failure.value)
    assert server.attempts == 0


def test_starttls_not_offered_is_permanent_and_nothing_is_sent_in_clear(smtp_server) -> None:
    server = smtp_server("none")
    with pytest.raises(PermanentDeliveryError, match="does not offer STARTTLS"):
        connect(
            SmtpSession(
                server.host,
                server.port,
                "starttls",
                server.username,
                server.password,
                timeout=10,
                destinations=TEST_DESTINATIONS,
            )
        )
    assert server.attempts == 0


def test_implicit_tls_against_a_plain_server_is_permanent(smtp_server) -> None:
    server = smtp_server("none")
    with pytest.raises(PermanentDeliveryError, match="TLS"):
        connect(
            SmtpSession(
                server.host,
                server.port,
                "tls",
                server.username,
                server.password,
                timeout=5,
                destinations=TEST_DESTINATIONS,
            )
        )


def test_connection_refused_is_temporary_with_readable_text() -> None:
    port = free_port()
    with pytest.raises(TemporaryDeliveryError) as failure:
        connect(SmtpSession("localhost", port, "starttls", "user", "secret", timeout=5, destinations=TEST_DESTINATIONS))
    assert str(failure.value) == f"connection refused by localhost:{port}"


def test_unknown_host_is_temporary() -> None:
    with pytest.raises(TemporaryDeliveryError, match="host not found"):
        connect(
            SmtpSession(
                "no-such-host.invalid", 587, "starttls", "user", "secret", timeout=5, destinations=TEST_DESTINATIONS
            )
        )


def test_a_silent_server_times_out_as_temporary() -> None:
    # Accepts the TCP connection (the kernel does, from the backlog) but never greets.
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with pytest.raises(TemporaryDeliveryError, match="did not answer in time"):
            connect(SmtpSession(LOOPBACK, port, "none", "user", "secret", timeout=0.5, destinations=TEST_DESTINATIONS))


def test_a_server_that_hangs_up_is_temporary() -> None:
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def greet_and_hang_up() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"220 hello\r\n")
                conn.recv(1024)  # EHLO

        thread = threading.Thread(target=greet_and_hang_up, daemon=True)
        thread.start()
        with pytest.raises(TemporaryDeliveryError, match="was lost"):
            connect(SmtpSession(LOOPBACK, port, "none", "user", "secret", timeout=5, destinations=TEST_DESTINATIONS))
        thread.join(5)


def test_greeting_with_554_is_permanent() -> None:
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def refuse() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"554 5.7.1 No service for you\r\n")
                conn.recv(1024)

        thread = threading.Thread(target=refuse, daemon=True)
        thread.start()
        with pytest.raises(PermanentDeliveryError, match="554 5.7.1 No service for you"):
            connect(SmtpSession(LOOPBACK, port, "none", "user", "secret", timeout=5, destinations=TEST_DESTINATIONS))
        thread.join(5)


def test_a_hostile_reply_is_shown_as_one_bounded_printable_line() -> None:
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def refuse() -> None:
            conn, _ = listener.accept()
            with conn:
                # A terminal escape that retitles the reader's window, then a flood.
                conn.sendall(b"554 5.7.1 \x1b]0;owned\x07\xe2\x80\xaeNo" + b"A" * 5000 + b"\r\n")
                conn.recv(1024)

        thread = threading.Thread(target=refuse, daemon=True)
        thread.start()
        with pytest.raises(PermanentDeliveryError) as failure:
            connect(SmtpSession(LOOPBACK, port, "none", "user", "secret", timeout=5, destinations=TEST_DESTINATIONS))
        thread.join(5)
    text = str(failure.value)
    assert failure.value.code == 554
    assert text.startswith("127.0.0.1 refused the connection: 554 5.7.1 ]0;owned NoAAAA")
    assert text.endswith("A…") and len(text) < 260 and text.isprintable()


def test_reply_lines_lose_control_characters_and_stay_short() -> None:
    assert reply_line("550 5.7.1 \x1b[2J\x1b[31mDenied\r\n\x00 by \u202epolicy") == "550 5.7.1 [2J [31mDenied by policy"
    assert reply_line(b"\xff\xfe 451 busy") == "\ufffd\ufffd 451 busy"
    assert len(reply_line("5" * 10_000)) == 200


def test_send_outside_the_session_and_bad_arguments(smtp_server) -> None:
    server = smtp_server("starttls")
    smtp = session(server)
    with pytest.raises(MailServerError, match="not connected"):
        smtp.send(SENDER, ["bob@example.org"], b"x\r\n")
    with session(server) as smtp:
        with pytest.raises(ValueError, match="line breaks"):
            smtp.send(SENDER, ["bob@example.org\r\nRCPT TO:<evil@example.com>"], b"x\r\n")
        with pytest.raises(ValueError, match="no recipients"):
            smtp.send(SENDER, [], b"x\r\n")
    assert server.messages == []


class ScriptedServer:
    """An SMTP server on 127.0.0.1 that answers from a script, for the failures aiosmtpd cannot stage.

    ``replies`` maps a command verb (EHLO, AUTH, MAIL, RCPT, DATA) to the reply; the rest get 250.
    ``after_data`` is what follows the final dot: a reply line, "silent" (say nothing, keep the
    connection open), "close" (hang up) or "close-during" (hang up as soon as the data begins).
    """

    def __init__(
        self,
        *,
        greeting: str = "220 test ready",
        replies: dict[str, str] | None = None,
        after_data: str = "250 2.0.0 queued",
    ) -> None:
        self.greeting, self.after_data = greeting, after_data
        self.replies = {
            "EHLO": "250-test\r\n250 AUTH PLAIN",
            "AUTH": "235 2.7.0 accepted",
            "DATA": "354 go ahead",
            **(replies or {}),
        }
        self.received_data = False
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(self.greeting.encode() + b"\r\n")
            while line := lines.readline():
                verb = line.split(b" ", 1)[0].strip().upper().decode()
                reply = self.replies.get(verb, "250 OK")
                if verb == "DATA" and reply.startswith("354"):
                    conn.sendall(reply.encode() + b"\r\n")
                    if self.after_data == "close-during":
                        return
                    while lines.readline() not in (b".\r\n", b""):
                        pass
                    self.received_data = True
                    if self.after_data == "silent":
                        self._done.wait(30)
                        return
                    if self.after_data == "close":
                        return
                    conn.sendall(self.after_data.encode() + b"\r\n")
                    continue
                conn.sendall(reply.encode() + b"\r\n")
                if verb == "QUIT" or reply.startswith("421"):
                    return

    def session(self, **kwargs: object) -> SmtpSession:
        options = {"timeout": 5, "destinations": TEST_DESTINATIONS, **kwargs}
        return SmtpSession(LOOPBACK, self.port, "none", "user", "secret", **options)

    def close(self) -> None:
        self._done.set()
        self.listener.close()
        self._thread.join(10)


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def start(**kwargs: object) -> ScriptedServer:
        servers.append(ScriptedServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def send_one(server: ScriptedServer, data: bytes | None = None, **kwargs: object) -> list[str]:
    """Send through the scripted server; returns the marks the caller's data-goes-out hook left."""
    marks: list[str] = []
    with server.session(**kwargs) as smtp:
        smtp.send(
            SENDER,
            ["bob@example.org"],
            data or message_bytes(["bob@example.org"]),
            before_data_end=lambda: marks.append("data going out"),
        )
    return marks


@pytest.mark.parametrize(
    ("script", "words"),
    [
        ({"greeting": "421 4.3.2 too busy, come back later"}, "421"),
        ({"replies": {"AUTH": "454 4.7.0 temporary authentication failure"}}, "454"),
        ({"replies": {"MAIL": "451 4.3.0 try again later"}}, "451"),
        ({"replies": {"RCPT": "450 4.2.1 mailbox busy"}}, "450"),
        ({"replies": {"DATA": "451 4.3.0 not now"}}, "451"),
        ({"after_data": "451 4.3.0 queue full"}, "451"),
    ],
)
def test_failures_before_the_server_could_have_accepted_are_temporary(scripted, script, words) -> None:
    server = scripted(**script)
    with pytest.raises(TemporaryDeliveryError, match=words):
        send_one(server)


def test_no_reply_to_the_final_dot_is_ambiguous_not_temporary(scripted) -> None:
    server = scripted(after_data="silent")
    marks: list[str] = []
    with (
        pytest.raises(AmbiguousDeliveryError, match="did not answer within 1 s") as failure,
        server.session(data_timeout=1) as smtp,
    ):
        smtp.send(
            SENDER, ["bob@example.org"], message_bytes(["bob@example.org"]), before_data_end=lambda: marks.append(1)
        )
    assert "may or may not have been accepted" in str(failure.value)
    assert not isinstance(failure.value, TemporaryDeliveryError | PermanentDeliveryError)
    assert marks == [1] and server.received_data


def test_a_hang_up_after_the_final_dot_is_ambiguous(scripted) -> None:
    server = scripted(after_data="close")
    with pytest.raises(AmbiguousDeliveryError, match="closed the connection without answering"):
        send_one(server)
    assert server.received_data


@pytest.mark.parametrize("reply", ["251 2.0.0 queued as 12345", "299 fine"])
def test_any_2xx_to_the_final_dot_is_sent(scripted, reply) -> None:
    # RFC 5321 4.2.1: every 2yz completes; taking it for a refusal would send the message again.
    server = scripted(after_data=reply)
    assert send_one(server) == ["data going out"]


@pytest.mark.parametrize(
    ("reply", "shown"),
    [
        ("OK: queued as 12345", "(a line without a reply code)"),
        ("2.0.0 Ok", "(a line without a reply code)"),
        ("354 more?", "(354 more?)"),
    ],
)
def test_a_final_reply_that_is_neither_yes_nor_no_is_ambiguous(scripted, reply, shown) -> None:
    server = scripted(after_data=reply)
    with pytest.raises(AmbiguousDeliveryError, match="may or may not have been accepted") as failure:
        send_one(server)
    assert shown in str(failure.value) and server.received_data


def test_a_hang_up_while_the_data_goes_out_is_temporary(scripted) -> None:
    # The final dot never left whole, so nothing can have been accepted: safe to try again.
    server = scripted(after_data="close-during")
    with pytest.raises(TemporaryDeliveryError):
        send_one(server, data=b"x" * 1000 + b"\r\n" + (b"y" * 998 + b"\r\n") * 20_000)
    assert not server.received_data


def test_a_refusal_before_the_data_never_marks_it_as_going_out(scripted) -> None:
    server = scripted(replies={"DATA": "554 5.7.1 no"})
    marks: list[str] = []
    with pytest.raises(PermanentDeliveryError, match="554"), server.session() as smtp:
        smtp.send(SENDER, ["bob@example.org"], b"Subject: x\r\n\r\nx\r\n", before_data_end=lambda: marks.append(1))
    assert marks == []
