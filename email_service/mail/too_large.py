"""What is stored for a message too large to download: its own headers, and a note in place of its body.

A message over ``protocols.connect.MAX_FETCHED_MESSAGE`` is not downloaded (a worker would have
to hold all of it), but the user should still see that it exists: who sent it, when, its
subject, its flags. The header section alone is fetched, its MIME headers give way to a plain
text note, and the result is stored as any message is.
"""

from __future__ import annotations

from email import message_from_bytes
from email import policy as email_policy

# The headers that describe the body left behind: the note replaces it.
_BODY_HEADERS = ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition", "MIME-Version")


def stand_in(headers: bytes, size_words: str, limit_words: str) -> bytes:
    """A message of ``headers`` (a header section as the server gave it) with a note as its body."""
    message = message_from_bytes(headers, policy=email_policy.compat32)
    for name in _BODY_HEADERS:
        del message[name]
    message["MIME-Version"] = "1.0"
    message.set_payload(
        f"This message is {size_words}, more than the {limit_words} this service downloads, so only its"
        " headers are shown here. Open it in another mail client to read it.\n",
        charset="utf-8",
    )
    return message.as_bytes(policy=email_policy.compat32.clone(linesep="\r\n"))


def shown_by_headers(folder: str, label: str, numbers: list[int], limit_words: str) -> str:
    """A sync's error naming the messages stored by their headers ("Inbox: 1 message(s) over 160 MB ... (UID 7)")."""
    listed = ", ".join(map(str, numbers[:5])) + (" ..." if len(numbers) > 5 else "")
    return (
        f"{folder}: {len(numbers)} message(s) over {limit_words} not downloaded, shown by their headers"
        f" ({label} {listed})"
    )
