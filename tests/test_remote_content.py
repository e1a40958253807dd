"""Remote content in shown HTML: held back on request, so opening a message tells the sender nothing."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from helpers import assert_error_shape
from messages import PNG_1X1, attachments_message, html_message, plain_message, to_bytes
from syncing import create_account, folders_by_name, imap_account, messages, run_sync

PIXEL = "https://track.example/open.gif?rcpt=bob%40example.org"
BANNER = "https://cdn.example/banner.png"
NEWSLETTER_HTML = f"""\
<html><body>
<table width="600"><tr><td background="https://cdn.example/bg.png" bgcolor="#eeeeee">
<img src="{BANNER}" alt="Spring sale" width="600" height="200">
<img srcset="https://cdn.example/banner@2x.png 2x" src="cid:logo@example.com" alt="Our logo">
</td></tr></table>
<p style="background-image: url(https://cdn.example/p.png); color: #333">Read the
<a href="https://shop.example/sale">whole offer</a>.</p>
<img src="{PIXEL}" width="1" height="1" alt="" border="0">
</body></html>
"""


@pytest.fixture
def inbox(sync_client, user, dovecot, mail_user, worker):
    """A synced IMAP inbox: a newsletter with remote images and an inline (cid) logo, a message
    whose only image is inline, and a plain-text message; and an empty folder "Newsletters"."""
    newsletter = html_message("Spring sale", NEWSLETTER_HTML)
    newsletter.get_payload()[1].add_related(
        PNG_1X1, "image", "png", cid="<logo@example.com>", filename="logo.png", disposition="inline"
    )
    dovecot.append(mail_user, "INBOX", to_bytes(newsletter))
    dovecot.append(mail_user, "INBOX", to_bytes(attachments_message("Only our own logo")))
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Just text")))
    dovecot.create_folder(mail_user, "Newsletters")
    account_id = create_account(sync_client, user, imap_account(dovecot, mail_user))
    assert run_sync(sync_client, user, account_id)[0]["status"] == "success"
    folder = folders_by_name(sync_client, user, account_id)["INBOX"]
    listed = {m["subject"]: m["id"] for m in messages(sync_client, user, account_id, folder["id"])["messages"]}
    return account_id, listed


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.found.append(dict(attrs))


def images(html: str) -> list[dict[str, str | None]]:
    """Every <img> in the HTML as its attributes (their order is the sanitiser's, not the sender's)."""
    parser = _Images()
    parser.feed(html)
    parser.close()
    return parser.found


# The newsletter's images once its remote URLs are held back: alt text and size hold the layout,
# and the message's own inline logo stays.
BLOCKED_IMAGES = [
    {"alt": "Spring sale", "width": "600", "height": "200"},
    {"src": "cid:logo@example.com", "alt": "Our logo"},
    {"alt": "", "width": "1", "height": "1", "border": "0"},
]


def read(client, user, account_id: str, message_id: str, **query) -> dict:
    response = client.get(f"/api/{account_id}/messages/{message_id}", params=query, headers=user.headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_block_holds_back_remote_images_and_keeps_inline_images_and_links(sync_client, user, inbox):
    account_id, listed = inbox
    allowed = read(sync_client, user, account_id, listed["Spring sale"])
    # Today's behaviour stays the default: the remote images load (and the sender learns of it).
    asked = read(sync_client, user, account_id, listed["Spring sale"], remoteContent="allow")
    assert (asked["bodyHtml"], asked["hasRemoteContent"]) == (allowed["bodyHtml"], allowed["hasRemoteContent"])
    assert [image.get("src") for image in images(allowed["bodyHtml"])] == [BANNER, "cid:logo@example.com", PIXEL]
    assert allowed["hasRemoteContent"] is True

    blocked = read(sync_client, user, account_id, listed["Spring sale"], remoteContent="block")
    html = blocked["bodyHtml"]
    assert blocked["hasRemoteContent"] is True
    # Nothing in the shown HTML would reach the network: not the banner, not the 1x1 tracking pixel,
    # nor the background and srcset URLs (which the sanitiser never lets through).
    for remote in ("https://cdn.example", "https://track.example", "url("):
        assert remote not in html, remote
    # The blocked images keep their place (alt text and size), the tracking pixel included.
    assert images(html) == BLOCKED_IMAGES
    # The link (loaded only on a click) stays.
    assert '<a href="https://shop.example/sale" rel="noopener noreferrer">whole offer</a>' in html
    assert 'style="color:#333"' in html and "Read the" in html
    # The rest of the answer is the same message.
    assert (blocked["id"], blocked["body"], len(blocked["attachments"])) == (
        allowed["id"],
        allowed["body"],
        len(allowed["attachments"]),
    )


def test_mail_with_nothing_remote_is_shown_unchanged_and_says_so(sync_client, user, inbox):
    account_id, listed = inbox
    own_logo = {
        mode: read(sync_client, user, account_id, listed["Only our own logo"], remoteContent=mode)
        for mode in ("allow", "block")
    }
    assert own_logo["allow"]["hasRemoteContent"] is False and own_logo["block"]["hasRemoteContent"] is False
    assert own_logo["block"]["bodyHtml"] == own_logo["allow"]["bodyHtml"]
    assert 'src="cid:logo-1@example.com"' in own_logo["block"]["bodyHtml"]

    for mode in ("allow", "block"):
        text = read(sync_client, user, account_id, listed["Just text"], remoteContent=mode)
        assert text["bodyHtml"] is None and text["hasRemoteContent"] is False
        assert "Hi Bob" in text["body"]


def test_html_written_here_is_held_back_too(sync_client, user, inbox):
    # Mail written through the API is stored as written and sanitised when shown.
    account_id, _ = inbox
    draft = sync_client.post(
        "/api/compose/draft",
        json={
            "accountId": account_id,
            "to": ["bob@example.org"],
            "subject": "Forwarded newsletter",
            "body": f"<p>Look:</p>{NEWSLETTER_HTML}",
            "isHtml": True,
        },
        headers=user.headers,
    )
    assert draft.status_code == 201, draft.text
    draft_id = draft.json()["draftId"]
    allowed = read(sync_client, user, account_id, draft_id)
    assert PIXEL in allowed["bodyHtml"] and allowed["hasRemoteContent"] is True
    blocked = read(sync_client, user, account_id, draft_id, remoteContent="block")
    assert blocked["hasRemoteContent"] is True and "Look:" in blocked["bodyHtml"]
    assert "https://cdn.example" not in blocked["bodyHtml"] and "https://track.example" not in blocked["bodyHtml"]
    assert images(blocked["bodyHtml"]) == BLOCKED_IMAGES
    assert 'href="https://shop.example/sale"' in blocked["bodyHtml"]


def test_only_the_two_modes_are_accepted(sync_client, user, inbox):
    account_id, listed = inbox
    url = f"/api/{account_id}/messages/{listed['Spring sale']}"
    for value in ("allow", "block"):
        assert sync_client.get(url, params={"remoteContent": value}, headers=user.headers).status_code == 200
    for value in ("BLOCK", "none", "", "true"):
        response = sync_client.get(url, params={"remoteContent": value}, headers=user.headers)
        body = assert_error_shape(response, 400, "VALIDATION_ERROR")
        assert body["message"] == "query parameter remoteContent must be one of allow, block"


def change(client, user, account_id: str, message_id: str, body: dict, **query) -> dict:
    response = client.patch(f"/api/{account_id}/messages/{message_id}", params=query, json=body, headers=user.headers)
    assert response.status_code == 200, response.text
    return response.json()


def move(client, user, account_id: str, message_id: str, folder_id: str, **query) -> dict:
    response = client.post(
        f"/api/{account_id}/messages/{message_id}/move",
        params=query,
        json={"folderId": folder_id},
        headers=user.headers,
    )
    assert response.status_code == 200, response.text
    return response.json()


def assert_held_back(shown: dict) -> None:
    """The newsletter as shown with remote content blocked: nothing in it reaches the network."""
    html = shown["bodyHtml"]
    for remote in ("https://cdn.example", "https://track.example", "url("):
        assert remote not in html, remote
    assert images(html) == BLOCKED_IMAGES
    assert 'href="https://shop.example/sale"' in html
    assert shown["hasRemoteContent"] is True


def test_marking_read_answers_with_remote_images_held_back_when_asked(sync_client, user, inbox):
    # A client that opened the newsletter with remote content blocked shows the answer to
    # "mark as read" in its place: the tracking pixel must not load then either.
    account_id, listed = inbox
    newsletter = listed["Spring sale"]
    blocked = change(sync_client, user, account_id, newsletter, {"isRead": True}, remoteContent="block")
    assert blocked["isRead"] is True
    assert_held_back(blocked)
    assert read(sync_client, user, account_id, newsletter, remoteContent="block")["bodyHtml"] == blocked["bodyHtml"]

    # Without the parameter, or with allow, the answer loads them as before.
    unread = change(sync_client, user, account_id, newsletter, {"isRead": False})
    starred = change(sync_client, user, account_id, newsletter, {"isStarred": True}, remoteContent="allow")
    assert unread["isRead"] is False and starred["isStarred"] is True
    for shown in (unread, starred):
        assert [image.get("src") for image in images(shown["bodyHtml"])] == [BANNER, "cid:logo@example.com", PIXEL]
        assert shown["hasRemoteContent"] is True


def test_a_move_answers_with_remote_images_held_back_when_asked(sync_client, user, inbox):
    account_id, listed = inbox
    folders = folders_by_name(sync_client, user, account_id)
    newsletter = listed["Spring sale"]
    moved = move(sync_client, user, account_id, newsletter, folders["Newsletters"]["id"], remoteContent="block")
    assert moved["folderId"] == folders["Newsletters"]["id"]
    assert_held_back(moved)

    back = move(sync_client, user, account_id, newsletter, folders["INBOX"]["id"])
    assert back["folderId"] == folders["INBOX"]["id"]
    assert [image.get("src") for image in images(back["bodyHtml"])] == [BANNER, "cid:logo@example.com", PIXEL]


def test_a_change_or_move_with_an_unknown_mode_is_refused_and_changes_nothing(sync_client, user, inbox):
    account_id, listed = inbox
    folders = folders_by_name(sync_client, user, account_id)
    url = f"/api/{account_id}/messages/{listed['Spring sale']}"
    for value in ("BLOCK", "none", "", "true"):
        for response in (
            sync_client.patch(url, params={"remoteContent": value}, json={"isRead": True}, headers=user.headers),
            sync_client.post(
                f"{url}/move",
                params={"remoteContent": value},
                json={"folderId": folders["Newsletters"]["id"]},
                headers=user.headers,
            ),
        ):
            body = assert_error_shape(response, 400, "VALIDATION_ERROR")
            assert body["message"] == "query parameter remoteContent must be one of allow, block"
    unchanged = read(sync_client, user, account_id, listed["Spring sale"])
    assert unchanged["isRead"] is False and unchanged["folderId"] == folders["INBOX"]["id"]
