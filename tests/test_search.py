"""Search across folders and conversations, on mail synced from a real Dovecot."""

from __future__ import annotations

import base64
import datetime as dt
import importlib
import json

import psycopg
import pytest
from helpers import User, assert_error_shape, libpq_url
from messages import ALICE, BOB, JUERGEN, ZOE, attachments_message, plain_message, thread, to_bytes
from syncing import create_account, folders_by_name, imap_account, run_sync

JAN_2023 = dt.datetime(2023, 1, 10, 12, 0, tzinfo=dt.UTC)
JUNE_2024 = dt.datetime(2024, 6, 3, 8, 30, tzinfo=dt.UTC)
MS = 1000


@pytest.fixture(scope="module")
def mailbox(sync_client, verifier, dovecot, worker):
    """One synced account with mail in several folders; read only by the tests below."""
    owner = User(verifier)
    mail_user = dovecot.add_user()
    for folder in ("Projects", "Archive"):
        dovecot.create_folder(mail_user, folder)
    inbox = [
        (plain_message("Quarterly budget review", "The numbers are in.\n", sender=ALICE), ["\\Seen", "\\Flagged"]),
        (plain_message("Lunch on Friday", "Shall we discuss the meetings over lunch?\n", sender=JUERGEN), []),
        (attachments_message("Files for you"), ["\\Seen", "Finance"]),
        (plain_message("Holiday photos", "Nothing about money here.\n", sender=ZOE, to=[JUERGEN], cc=[BOB]), []),
    ]
    for hour, (message, flags) in enumerate(inbox):
        received = JUNE_2024 + dt.timedelta(hours=hour)
        dovecot.append(mail_user, "INBOX", to_bytes(message), flags=flags, internaldate=received)
    dovecot.append(
        mail_user, "Archive", to_bytes(plain_message("Old budget", "Budget of 2022.\n")), internaldate=JAN_2023
    )
    chain = thread(4, subject="Project kickoff")
    for message in chain[:3]:
        dovecot.append(mail_user, "Projects", to_bytes(message), internaldate=message["Date"].datetime)
    # The last reply was filed elsewhere: the conversation spans folders.
    dovecot.append(mail_user, "Archive", to_bytes(chain[3]), flags=["\\Seen"], internaldate=chain[3]["Date"].datetime)
    account_id = create_account(sync_client, owner, imap_account(dovecot, mail_user))
    assert run_sync(sync_client, owner, account_id)[0]["status"] == "success"
    return sync_client, owner, account_id


def search(mailbox, **params) -> dict:
    client, owner, account_id = mailbox
    response = client.get(f"/api/{account_id}/search", params=params, headers=owner.headers)
    assert response.status_code == 200, response.text
    return response.json()


def subjects(mailbox, **params) -> list[str]:
    return [m["subject"] for m in search(mailbox, **params)["messages"]]


def test_words_are_found_across_folders_best_first(mailbox):
    # In the subject and the body outranks the subject alone, however much newer; the archived
    # message is found as well as the one in the inbox.
    assert subjects(mailbox, q="budget") == ["Old budget", "Quarterly budget review"]
    client, owner, account_id = mailbox
    inbox = folders_by_name(client, owner, account_id)["INBOX"]
    assert subjects(mailbox, q="budget", folderId=inbox["id"]) == ["Quarterly budget review"]


def test_stemming_addresses_and_attachment_names_are_searchable(mailbox):
    assert subjects(mailbox, q="meeting") == ["Lunch on Friday"]  # the body says "meetings"
    # Found as the sender (ranked first) and as a recipient.
    assert subjects(mailbox, q="juergen@example.de") == ["Lunch on Friday", "Holiday photos"]
    assert subjects(mailbox, q="Müller") == ["Lunch on Friday"]  # the sender's name (recipients' are not kept)
    assert subjects(mailbox, q="Résumé") == ["Files for you"]  # only in an attachment's name
    assert subjects(mailbox, q='"quarterly budget"') == ["Quarterly budget review"]
    assert subjects(mailbox, q="budget -quarterly") == ["Old budget"]
    assert subjects(mailbox, q="nothingmatchesthis") == []
    assert search(mailbox, q="!!!")["messages"]  # no words: the filters alone, all mail


def test_a_word_excluded_with_a_minus_excludes_mail_that_holds_it_only_in_the_body(mailbox):
    # "numbers" is in the body of "Quarterly budget review" only (indexed stemmed), "budget" in
    # its subject: the message holds the excluded word, so it is not a result.
    assert subjects(mailbox, q="budget -numbers") == ["Old budget"]
    assert subjects(mailbox, q='budget -"numbers are"') == ["Old budget"]
    assert subjects(mailbox, q="budget -numbers", isRead="false") == ["Old budget"]
    # Excluding a word no budget message holds leaves both; the word alone still finds it.
    assert sorted(subjects(mailbox, q="budget -holiday")) == ["Old budget", "Quarterly budget review"]
    assert subjects(mailbox, q="numbers") == ["Quarterly budget review"]


def test_filters_narrow_and_combine(mailbox):
    assert subjects(mailbox, **{"from": "juergen"}) == ["Lunch on Friday"]
    assert subjects(mailbox, **{"from": "Jürgen Mül"}) == ["Lunch on Friday"]  # word prefixes of the name
    assert subjects(mailbox, to="juergen@example.de") == ["Holiday photos"]
    assert subjects(mailbox, to="bob@example.org", q="photos") == ["Holiday photos"]  # Cc counts
    assert subjects(mailbox, subject="lunch") == ["Lunch on Friday"]
    assert subjects(mailbox, subject="numbers") == []  # a body word is not a subject word
    assert subjects(mailbox, isStarred="true") == ["Quarterly budget review"]
    assert subjects(mailbox, hasAttachment="true") == ["Files for you"]
    assert subjects(mailbox, label="Finance") == ["Files for you"]
    assert "Files for you" not in subjects(mailbox, isRead="false")
    assert subjects(mailbox, q="budget", before=int(dt.datetime(2024, 1, 1, tzinfo=dt.UTC).timestamp()) * MS) == [
        "Old budget"
    ]
    assert subjects(mailbox, q="budget", after=int(JUNE_2024.timestamp()) * MS) == ["Quarterly budget review"]
    client, owner, account_id = mailbox
    archive = folders_by_name(client, owner, account_id)["Archive"]
    assert sorted(subjects(mailbox, folderId=archive["id"])) == ["Old budget", "Re: Project kickoff"]


def test_pages_follow_the_cursor_without_gaps_or_repeats(mailbox):
    for params in ({}, {"q": "budget or lunch or project"}):
        everything = search(mailbox, limit=100, **params)
        assert everything["nextCursor"] is None
        walked, cursor = [], None
        for _ in range(20):
            page = search(mailbox, limit=2, **params, **({"cursor": cursor} if cursor else {}))
            walked += [m["id"] for m in page["messages"]]
            cursor = page["nextCursor"]
            if cursor is None:
                break
        assert walked == [m["id"] for m in everything["messages"]] and len(walked) > 2


def test_a_cursor_from_another_query_or_made_up_is_refused(mailbox):
    client, owner, account_id = mailbox
    cursor = search(mailbox, q="budget", limit=1)["nextCursor"]
    for params in ({"q": "lunch", "cursor": cursor}, {"cursor": "bm90IGEgY3Vyc29y"}, {"cursor": "AAAA"}):
        response = client.get(f"/api/{account_id}/search", params=params, headers=owner.headers)
        assert_error_shape(response, 409, "INVALID_CURSOR")
    response = client.get(f"/api/{account_id}/search", params={"cursor": "%%%"}, headers=owner.headers)
    assert_error_shape(response, 400)
    # The query's own cursor, rewritten: a window's floor without a place in the window, or half a key.
    document = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    assert document["k"][0] is not None  # the last hit's rank
    # Or a rank no search gives: beyond PostgreSQL's real, or not finite.
    odd_ranks = ([rank, *document["k"][1:]] for rank in (1e39, -(10**40), 10**400, 1e300, float("inf"), float("nan")))
    for key in ([None, None, None, 1, "x", None, None], [*document["k"][:5], 1, None], *odd_ranks):
        forged = base64.urlsafe_b64encode(json.dumps({**document, "k": key}).encode()).decode().rstrip("=")
        response = client.get(
            f"/api/{account_id}/search", params={"q": "budget", "cursor": forged}, headers=owner.headers
        )
        assert_error_shape(response, 409, "INVALID_CURSOR")


def test_odd_input_gives_results_or_a_clean_4xx(mailbox):
    client, owner, account_id = mailbox
    assert subjects(mailbox, q="lunch\x00") == ["Lunch on Friday"]
    assert subjects(mailbox, label="Fin\x00ance") == []
    assert subjects(mailbox, q='"unbalanced -- or or !!') is not None
    response = client.get(f"/api/{account_id}/search", params={"folderId": "a\x00b"}, headers=owner.headers)
    assert_error_shape(response, 404, "FOLDER_NOT_FOUND")
    response = client.get(f"/api/{account_id}/search", params={"after": "yesterday"}, headers=owner.headers)
    assert_error_shape(response, 400)


def test_another_tenant_finds_nothing_of_it(mailbox, make_user):
    client, _owner, account_id = mailbox
    stranger = make_user()
    for path in (
        f"/api/{account_id}/search?q=budget",
        f"/api/{account_id}/conversations/anything",
    ):
        response = client.get(path, headers=stranger.headers)
        assert response.status_code == 404 and response.json()["code"] == "ACCOUNT_NOT_FOUND"


def test_a_folder_by_conversation_and_one_conversation_across_folders(mailbox):
    client, owner, account_id = mailbox
    projects = folders_by_name(client, owner, account_id)["Projects"]
    response = client.get(f"/api/{account_id}/folders/{projects['id']}/conversations", headers=owner.headers)
    assert response.status_code == 200, response.text
    [conversation] = response.json()["conversations"]
    assert conversation["messageCount"] == 3 and conversation["unreadCount"] == 3
    assert conversation["participants"] == ["alice@example.com", "bob@example.org"]
    assert conversation["latestMessage"]["subject"] == "Re: Project kickoff"
    assert conversation["latestMessage"]["conversationId"] == conversation["id"]

    whole = client.get(f"/api/{account_id}/conversations/{conversation['id']}", headers=owner.headers).json()
    assert [m["subject"] for m in whole["messages"]] == ["Project kickoff"] + ["Re: Project kickoff"] * 3
    received = [m["receivedAt"] for m in whole["messages"]]
    assert received == sorted(received)
    archive = folders_by_name(client, owner, account_id)["Archive"]
    assert [m["folderId"] for m in whole["messages"]][-1] == archive["id"]
    first = client.get(
        f"/api/{account_id}/conversations/{conversation['id']}", params={"limit": 3}, headers=owner.headers
    ).json()
    rest = client.get(
        f"/api/{account_id}/conversations/{conversation['id']}",
        params={"limit": 3, "cursor": first["nextCursor"]},
        headers=owner.headers,
    ).json()
    assert [m["id"] for m in first["messages"] + rest["messages"]] == [m["id"] for m in whole["messages"]]
    assert rest["nextCursor"] is None

    missing = client.get(f"/api/{account_id}/conversations/no-such-thing", headers=owner.headers)
    assert missing.status_code == 404 and missing.json()["code"] == "CONVERSATION_NOT_FOUND"


def test_the_inbox_by_conversation_pages_newest_first(mailbox):
    client, owner, account_id = mailbox
    inbox = folders_by_name(client, owner, account_id)["INBOX"]
    url = f"/api/{account_id}/folders/{inbox['id']}/conversations"
    everything = client.get(url, headers=owner.headers).json()["conversations"]
    assert len(everything) == 4 and all(c["messageCount"] == 1 for c in everything)
    latest = [c["latestReceivedAt"] for c in everything]
    assert latest == sorted(latest, reverse=True)
    walked, cursor = [], None
    for _ in range(20):
        page = client.get(url, params={"limit": 3, **({"cursor": cursor} if cursor else {})}, headers=owner.headers)
        walked += [c["id"] for c in page.json()["conversations"]]
        cursor = page.json()["nextCursor"]
        if cursor is None:
            break
    assert walked == [c["id"] for c in everything]


@pytest.fixture(scope="module")
def status_reports(sync_client, verifier, dovecot, worker):
    """Nine reports with the same words: six recent in the inbox, three older archived (one starred)."""
    owner = User(verifier)
    mail_user = dovecot.add_user()
    dovecot.create_folder(mail_user, "Archive")
    for day in range(9):
        folder = "Archive" if day < 3 else "INBOX"
        message = plain_message(f"Weekly status number{day}", "The status is green.\n")
        flags = ["\\Flagged"] if day == 1 else []
        dovecot.append(
            mail_user, folder, to_bytes(message), flags=flags, internaldate=JUNE_2024 + dt.timedelta(days=day)
        )
    account_id = create_account(sync_client, owner, imap_account(dovecot, mail_user))
    assert run_sync(sync_client, owner, account_id)[0]["status"] == "success"
    return sync_client, owner, account_id


def walk(mailbox, cursor=None, **params) -> list[str]:
    """Every page of a search, by following its cursor, as subjects."""
    walked = []
    for _ in range(20):
        page = search(mailbox, limit=2, **params, **({"cursor": cursor} if cursor else {}))
        walked += [m["subject"] for m in page["messages"]]
        cursor = page["nextCursor"]
        if cursor is None:
            return walked
    raise AssertionError("the cursor never ended")


@pytest.fixture
def window_of_four(monkeypatch):
    # The ranked window and the first pass over matches, made small enough for nine messages.
    from email_service.search import service

    monkeypatch.setattr(service, "RANKED_WINDOW", 4)
    monkeypatch.setattr(service, "FIRST_PASS", 2)


def test_a_word_ranks_windows_of_its_newest_matches_in_turn(sync_client, verifier, dovecot, worker, window_of_four):
    # "status" in the subject outranks it in the body alone, within a window of four: the
    # newest four matches ranked, then the next four below them, then the oldest.
    owner = User(verifier)
    mail_user = dovecot.add_user()
    for day in range(9):
        subject = f"Weekly status number{day}" if day % 2 else f"Weekly report number{day}"
        message = plain_message(subject, "The status is green.\n")
        dovecot.append(mail_user, "INBOX", to_bytes(message), internaldate=JUNE_2024 + dt.timedelta(days=day))
    account_id = create_account(sync_client, owner, imap_account(dovecot, mail_user))
    assert run_sync(sync_client, owner, account_id)[0]["status"] == "success"
    assert [subject[-1] for subject in walk((sync_client, owner, account_id), q="status")] == list("758631420")


@pytest.fixture
def rows_walked(backing, monkeypatch):
    """Windows found as a large mailbox's common words are, by walking its rows, three at most.

    A mailbox of nine messages is read through the GIN index whatever the words, and the bound
    on rows read only applies to a walk; with bitmap scans off the planner has no other way.
    """
    from email_service.search import service

    monkeypatch.setattr(service, "SCANNED_ROWS", 3)
    function = (
        f"email_search_window({importlib.import_module('email_service.migrations.versions.0018_search_windows').TYPES})"
    )
    with psycopg.connect(libpq_url(backing.database_url), autocommit=True) as conn:
        conn.execute(f"ALTER FUNCTION {function} SET enable_bitmapscan = off")
        try:
            yield
        finally:
            conn.execute(f"ALTER FUNCTION {function} RESET enable_bitmapscan")


def pages(mailbox, limit=2, **params) -> list[str]:
    """Every page of a search, as the last character of each subject."""
    walked, cursor = [], None
    for _ in range(20):
        page = search(mailbox, limit=limit, **params, **({"cursor": cursor} if cursor else {}))
        walked.append("".join(m["subject"][-1] for m in page["messages"]))
        cursor = page["nextCursor"]
        if cursor is None:
            return walked
    raise AssertionError("the cursor never ended")


def test_a_window_that_reads_few_rows_ends_where_it_stopped_and_the_next_goes_on(
    status_reports, window_of_four, rows_walked, monkeypatch
):
    from email_service.search import service

    # Each window reads three rows: a page ends with its window, shorter than asked for, and
    # the next page begins the window below; every match comes once, newest first (equal ranks).
    assert pages(status_reports, q='"status is green"') == ["87", "6", "54", "3", "21", "0"]
    # Rows read that do not match still count: the third window holds one match, not three.
    assert pages(status_reports, q="status -number4 -number3") == ["87", "6", "5", "21", "0"]
    # Unranked, with no time for a second read: a page holds what one read of three rows found.
    monkeypatch.setattr(service, "WINDOW_SECONDS", 0)
    assert pages(status_reports, limit=4, subject="status") == ["876", "543", "210"]


def test_a_window_whose_time_is_up_ends_where_its_walks_got_to(status_reports, window_of_four, monkeypatch):
    from email_service.search import service

    monkeypatch.setattr(service, "WINDOW_SECONDS", 0)
    # With a filter on messages a window is found by walks; out of time, it holds what their
    # first passes found (two rows each), a page of three holds two, and the next page goes on.
    assert pages(status_reports, limit=3, q="status", isRead="false") == ["87", "65", "43", "21", "0"]
    # Unranked, a page ends where the walks got to, the same way.
    assert pages(status_reports, limit=3, subject="status", isRead="false") == ["87", "65", "43", "21", "0"]


def test_a_common_word_with_a_selective_filter_finds_the_older_messages_that_pass_it(status_reports, window_of_four):
    client, owner, account_id = status_reports
    archive = folders_by_name(client, owner, account_id)["Archive"]
    # None of the archived reports is among the newest four matches; they are still found.
    assert walk(status_reports, q="status", folderId=archive["id"]) == [
        "Weekly status number2",
        "Weekly status number1",
        "Weekly status number0",
    ]
    assert walk(status_reports, q="status", isStarred="true") == ["Weekly status number1"]
    assert walk(status_reports, q="status", isRead="false", before=int(JUNE_2024.timestamp() + 86400 * 5) * MS) == [
        f"Weekly status number{day}" for day in (4, 3, 2, 1, 0)
    ]


def test_field_filters_page_through_every_match(status_reports, window_of_four):
    # Without words nothing is ranked, so there is no window: all nine, newest first.
    assert walk(status_reports, subject="status") == [f"Weekly status number{day}" for day in range(8, -1, -1)]


def test_new_mail_between_pages_pushes_nothing_out_of_the_pages_still_to_come(
    sync_client, verifier, dovecot, worker, window_of_four
):
    owner = User(verifier)
    mail_user = dovecot.add_user()

    def deliver(days):
        for day in days:
            message = plain_message(f"Weekly status number{day}", "The status is green.\n")
            dovecot.append(mail_user, "INBOX", to_bytes(message), internaldate=JUNE_2024 + dt.timedelta(days=day))

    deliver(range(6))
    account_id = create_account(sync_client, owner, imap_account(dovecot, mail_user))
    assert run_sync(sync_client, owner, account_id)[0]["status"] == "success"
    mailbox = (sync_client, owner, account_id)
    first = search(mailbox, q="status", limit=2)
    assert [m["subject"] for m in first["messages"]] == ["Weekly status number5", "Weekly status number4"]
    # Two newer reports arrive: the newest four matches are now others, but the pages still
    # to come are the rest of the four the first page was ranked among.
    deliver((6, 7))
    assert run_sync(sync_client, owner, account_id)[0]["status"] == "success"
    rest = search(mailbox, q="status", limit=2, cursor=first["nextCursor"])
    assert [m["subject"] for m in rest["messages"]] == ["Weekly status number3", "Weekly status number2"]
    # Then the window below the first: the older two, not the new ones again.
    assert walk(mailbox, q="status", cursor=rest["nextCursor"]) == ["Weekly status number1", "Weekly status number0"]
    # A new search ranks the newest four, then the four below them.
    assert walk(mailbox, q="status") == [f"Weekly status number{day}" for day in range(7, -1, -1)]


def test_a_phrase_in_one_folder_or_among_starred_mail_pages_through_its_window_once(status_reports, window_of_four):
    client, owner, account_id = status_reports
    folders = folders_by_name(client, owner, account_id)
    phrase = '"status is green"'
    # Pages of two: the six inbox matches, each once, in windows of four; the three archived ones; the starred one.
    assert walk(status_reports, q=phrase, folderId=folders["INBOX"]["id"]) == [
        f"Weekly status number{day}" for day in (8, 7, 6, 5, 4, 3)
    ]
    assert walk(status_reports, q=phrase, folderId=folders["Archive"]["id"]) == [
        f"Weekly status number{day}" for day in (2, 1, 0)
    ]
    assert walk(status_reports, q=phrase, isStarred="true") == ["Weekly status number1"]
    assert walk(status_reports, q=phrase, isStarred="false", folderId=folders["Archive"]["id"]) == [
        "Weekly status number2",
        "Weekly status number0",
    ]


def test_a_moved_or_starred_message_is_found_where_it_is_now(sync_client, verifier, dovecot, worker):
    owner = User(verifier)
    mail_user = dovecot.add_user()
    dovecot.create_folder(mail_user, "Archive")
    for day in range(3):
        message = plain_message(f"Budget plan {day}", "The budget is final.\n")
        dovecot.append(mail_user, "INBOX", to_bytes(message), internaldate=JUNE_2024 + dt.timedelta(days=day))
    account_id = create_account(sync_client, owner, imap_account(dovecot, mail_user))
    assert run_sync(sync_client, owner, account_id)[0]["status"] == "success"
    mailbox = (sync_client, owner, account_id)
    folders = folders_by_name(sync_client, owner, account_id)
    inbox, archive = folders["INBOX"]["id"], folders["Archive"]["id"]
    ids = {m["subject"]: m["id"] for m in search(mailbox, q="budget")["messages"]}

    response = sync_client.post(
        f"/api/{account_id}/messages/move",
        json={"messageIds": [ids["Budget plan 0"], ids["Budget plan 1"]], "folderId": archive},
        headers=owner.headers,
    )
    assert response.status_code == 200, response.text
    assert subjects(mailbox, q="budget", folderId=archive) == ["Budget plan 1", "Budget plan 0"]
    assert subjects(mailbox, q="budget", folderId=inbox) == ["Budget plan 2"]

    def star(subject: str, starred: bool) -> None:
        response = sync_client.patch(
            f"/api/{account_id}/messages/{ids[subject]}", json={"isStarred": starred}, headers=owner.headers
        )
        assert response.status_code == 200, response.text

    star("Budget plan 1", True)
    assert subjects(mailbox, q="budget", isStarred="true") == ["Budget plan 1"]
    assert subjects(mailbox, q="budget", isStarred="false") == ["Budget plan 2", "Budget plan 0"]
    star("Budget plan 1", False)
    assert subjects(mailbox, q="budget", isStarred="true") == []
