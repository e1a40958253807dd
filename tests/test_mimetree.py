"""The whole-message MIME parser builds exactly the tree the standard feed parser builds.

``parse_message`` relies on that: every field it derives (bodies, attachments, defects) comes
from the tree. The inputs sit on the feed parser's decision points: boundary and delimiter lines
with every line ending, nested multiparts, message/* parts, delivery-status blocks, unix-from
lines, missing separators, truncations and byte damage.
"""

from __future__ import annotations

import random
from email import policy
from email.message import Message
from email.parser import BytesParser

import pytest
from messages import (
    attachments_message,
    html_message,
    international_message,
    malformed_message,
    plain_message,
    realistic_mix,
    to_bytes,
)

from email_service.mail.headers import PARSE_POLICY
from email_service.mail.mimetree import parse_bytes

POLICIES = [policy.compat32, policy.default, PARSE_POLICY]


def shape(msg: Message) -> tuple:
    payload = msg._payload
    return (
        type(msg).__name__,
        list(msg._headers),
        msg.get_unixfrom(),
        msg.preamble,
        msg.epilogue,
        [(type(d).__name__, str(d)) for d in msg.defects],
        msg.get_default_type(),
        [shape(part) for part in payload] if isinstance(payload, list) else payload,
    )


def outcome(parse, raw: bytes, chosen) -> tuple:
    try:
        return shape(parse(raw, chosen))
    except Exception as exc:  # noqa: BLE001 - both parsers must fail alike, too
        return ("raised", type(exc).__name__)


def stdlib(raw: bytes, chosen) -> Message:
    return BytesParser(policy=chosen).parsebytes(raw)


def assert_same_trees(samples: list[bytes]) -> None:
    for chosen in POLICIES:
        for raw in samples:
            assert outcome(parse_bytes, raw, chosen) == outcome(stdlib, raw, chosen), raw[:300]


def line_soup(rng: random.Random) -> bytes:
    """A message of lines the parser has to decide about."""
    content_types = [
        'multipart/mixed; boundary="B"',
        "multipart/alternative; boundary=b2",
        'multipart/digest; boundary="x y"',
        "multipart/related",
        "message/rfc822",
        "message/delivery-status",
        "text/plain",
        "message/partial",
    ]
    others = ["From: a@b", "From x@y Mon", "Subject: s", " continued", "\tcont", ":bad", "no colon", "From "]
    others += ["Content-Transfer-Encoding: base64", "Content-Transfer-Encoding: quoted-printable", "-", "--", "é"]
    lines = []
    for _ in range(rng.randint(0, 40)):
        end = rng.choice(["\r\n", "\n", "\r"]) if rng.random() < 0.97 else ""
        pick = rng.random()
        if pick < 0.18:
            lines.append("Content-Type: " + rng.choice(content_types) + end)
        elif pick < 0.35:
            boundary = rng.choice(["B", "b2", "x y", ""])
            lines.append("--" + boundary + rng.choice(["", "--", " ", "\t", "-- ", "---", "x", "--x"]) + end)
        elif pick < 0.45:
            lines.append(end or "\n")
        elif pick < 0.55:
            lines.append(rng.choice(others) + end)
        else:
            lines.append(rng.choice(["body text", "aGVsbG8=", "=C3=A9", "- item", "> quote", "", "\udcff"]) + end)
    return "".join(lines).encode("utf-8", "surrogateescape")


def test_realistic_and_crafted_messages():
    samples = list(realistic_mix(60, seed=11))
    samples += [to_bytes(m) for m in (plain_message(), html_message(), attachments_message(), international_message())]
    samples += [malformed_message(), b"", b"\r\n", b"no header at all", b"From: a@b\r\n\r\nbody without end"]
    assert_same_trees(samples)


def test_truncated_and_damaged_messages():
    rng = random.Random(5)
    whole = [to_bytes(attachments_message()), malformed_message(), *realistic_mix(5, seed=3)]
    samples = []
    for raw in whole:
        samples += [raw[:cut] for cut in sorted(rng.sample(range(len(raw)), min(len(raw), 60)))]
        for _ in range(30):
            damaged = bytearray(raw)
            for _ in range(rng.randint(1, 8)):
                damaged[rng.randrange(len(damaged))] = rng.choice(b'-\r\n \t=:"')
            samples.append(bytes(damaged))
    assert_same_trees(samples)


@pytest.mark.parametrize("seed", range(4))
def test_line_soup(seed):
    rng = random.Random(seed)
    assert_same_trees([line_soup(rng) for _ in range(400)])


def test_delivery_status_digest_and_nested_messages():
    report = (
        b"From: mailer@example.com\r\nContent-Type: multipart/report; boundary=R\r\n\r\n"
        b"--R\r\nContent-Type: text/plain\r\n\r\nundeliverable\r\n"
        b"--R\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
        b"Final-Recipient: rfc822; a@b\r\nAction: failed\r\n\r\n"
        b"--R\r\nContent-Type: message/rfc822\r\n\r\nFrom: a@b\r\nContent-Type: multipart/digest; boundary=D\r\n\r\n"
        b"--D\r\n\r\nFrom: x@y\r\n\r\ndigest entry\r\n--D--\r\n--R--\r\nepilogue\r\n"
    )
    samples = [report, report.replace(b"\r\n", b"\n"), report.replace(b"\r\n", b"\r"), report[:-20]]
    assert_same_trees(samples)
