"""Real time: `email-service watch` holds IMAP IDLE on Dovecot and brings changes in, unasked.

No sync is requested in the watcher's tests: whatever the API shows after the account is created
comes from the watcher (the shared test worker runs no scheduler). The last tests call what the
watcher's threads run on a reported change (``refresh_folder``) directly, with the shared worker
running the syncs it queues.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import subprocess
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime

import psutil
import pytest
import redis
from helpers import TEST_DESTINATIONS
from mailservers import CapabilityHidingProxy, ScriptedImapServer
from messages import plain_message, to_bytes
from sqlalchemy import text, update
from syncing import (
    add_task,
    create_account,
    eventually,
    folders_by_name,
    imap_account,
    inbox_subjects,
    scripted_account,
    tasks_of,
    wait_task,
    watcher,
)

from email_service.db import Database
from email_service.mailbox.imap_sync import remote_folders
from email_service.mailbox.live import refresh_folder
from email_service.mailbox.store import MailStore
from email_service.models import Task, TaskStatus
from email_service.protocols.errors import ConnectionFailed
from email_service.protocols.servers import MailServer, Protocol
from email_service.protocols.tls import client_context
from email_service.queue.locks import AccountLock
from email_service.runtime import Runtime
from email_service.watch import watcher as watcher_module
from email_service.watch.idle import IdleConnection
from email_service.watch.leases import Leases
from email_service.watch.watcher import Watchable, Watcher, watchable_accounts

LEASE_SECONDS = 3


@pytest.fixture
def client(sync_client):
    return sync_client


def watcher_process(backing, dovecot, log_path):
    return watcher(backing, dovecot, log_path, EMAIL_SERVICE_WATCH_LEASE_SECONDS=str(LEASE_SECONDS))


def test_new_mail_flags_and_expunges_arrive_within_a_second_without_a_sync(
    client, runtime, user, dovecot, mail_user, backing, tmp_path
):
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Before watching")))
    account_id = create_account(client, user, imap_account(dovecot, mail_user, isSyncEnabled=True, syncInterval=604800))
    with watcher_process(backing, dovecot, tmp_path / "watch.log"):
        # On taking the account the watcher catches up with what is already there. It takes every
        # account of the session's database at once (near 200 by now, many on this Dovecot) and
        # catches each up, so on a loaded machine this one may wait its turn.
        assert eventually(lambda: "Before watching" in inbox_subjects(client, user, account_id), 90), (
            tmp_path / "watch.log"
        ).read_text()
        assert Leases(runtime.redis, "probe").holder(account_id)
        time.sleep(0.5)  # the watcher is back in IDLE

        appended = time.monotonic()
        dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Pushed to us")))
        assert eventually(lambda: "Pushed to us" in inbox_subjects(client, user, account_id), 10)
        latency = time.monotonic() - appended
        assert latency < 3, latency  # well under a second on an idle machine; shared CI gets slack

        with dovecot.imap(mail_user) as other:
            other.select("INBOX")
            _, data = other.uid("SEARCH", "SUBJECT", '"Pushed to us"')
            uid = data[0].split()[0]
            other.uid("STORE", uid, "+FLAGS", "(\\Seen \\Flagged)")
        assert eventually(
            lambda: (inbox_subjects(client, user, account_id).get("Pushed to us") or {}).get("isStarred"), 10
        )

        with dovecot.imap(mail_user) as other:
            other.select("INBOX")
            _, data = other.uid("SEARCH", "SUBJECT", '"Before watching"')
            other.uid("STORE", data[0].split()[0], "+FLAGS", "(\\Deleted)")
            other.expunge()
        assert eventually(lambda: "Before watching" not in inbox_subjects(client, user, account_id), 10)
        assert "Pushed to us" in inbox_subjects(client, user, account_id)


def test_each_account_has_one_watcher_and_a_dead_watchers_accounts_move(
    client, runtime, make_user, dovecot, backing, tmp_path
):
    owner = make_user()
    accounts = [
        create_account(
            client, owner, imap_account(dovecot, dovecot.add_user(), isSyncEnabled=True, syncInterval=604800)
        )
        for _ in range(6)
    ]
    leases = Leases(runtime.redis, "probe")
    with watcher_process(backing, dovecot, tmp_path / "a.log") as first:
        with watcher_process(backing, dovecot, tmp_path / "b.log") as second:

            def holders() -> dict[str, str | None]:
                return {a: leases.holder(a) for a in accounts}

            assert eventually(lambda: all(holders().values()), 30), "not every account was taken"

            # The share evens out: both watchers hold some of the accounts, and one lease each.
            # Counted over every watchable account of the session's database, not just these six:
            # which of them land with which watcher is a random draw among all of them.
            def holding_pids() -> set[int]:
                held = (leases.holder(a) for a in watchable_accounts(runtime))
                return {int(h.split(":")[1]) for h in held if h}

            assert eventually(lambda: holding_pids() == {first.pid, second.pid}, LEASE_SECONDS * 6), holding_pids()

            # SIGKILL one: its leases run out and the other takes its accounts.
            for process in [psutil.Process(second.pid), *psutil.Process(second.pid).children(recursive=True)]:
                process.send_signal(signal.SIGKILL)
            second.wait()
            moved = eventually(
                lambda: all((h := leases.holder(a)) and int(h.split(":")[1]) == first.pid for a in accounts),
                LEASE_SECONDS * 6,
                every=0.2,
            )
            assert moved, {a: leases.holder(a) for a in accounts}

        # The survivor still brings mail in for an account it took over.
        mailbox_user = dovecot.add_user()
        account_id = create_account(
            client, owner, imap_account(dovecot, mailbox_user, isSyncEnabled=True, syncInterval=604800)
        )
        assert eventually(lambda: leases.holder(account_id), LEASE_SECONDS * 6)
        # Its watch is up once its first catch-up has brought the inbox in (behind the catch-ups of
        # every account the survivor took over: slow on a busy machine). Mail arriving before
        # the IDLE began would be the catch-up's to bring, not the IDLE's, which is tested here.
        watched = eventually(lambda: "INBOX" in folders_by_name(client, owner, account_id), 120)
        assert watched, "the survivor never caught the new account up"
        dovecot.append(mailbox_user, "INBOX", to_bytes(plain_message("Taken over")))
        assert eventually(lambda: "Taken over" in inbox_subjects(client, owner, account_id), 30)
    # A clean stop hands the leases back at once.
    assert all(leases.holder(a) is None for a in accounts)


@pytest.fixture(scope="module")
def live_runtime(backing, dovecot):
    """What the watcher's threads run with: trusting the test servers' CA."""
    runtime = Runtime.build(replace(backing, ca_file=dovecot.ca_file))
    yield runtime
    runtime.close()


def test_a_backlog_gets_its_newest_mail_at_once_and_the_rest_from_a_queued_sync(
    client, live_runtime, user, dovecot, mail_user, worker
):
    runtime = live_runtime
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    for n in range(12):
        dovecot.append(mail_user, "INBOX", to_bytes(plain_message(f"Backlog {n:02d}")))

    result = refresh_folder(runtime, user.principal, account_id, "INBOX", max_new=5)
    assert result is not None and result.messages_added == 5 and result.folders_left == ["INBOX"]
    # What the change stored at once is the newest five, committed before anything of the sync's.
    with runtime.db.maintenance_session() as session:
        first_stored = session.execute(
            text(
                "SELECT subject FROM messages WHERE account_id = :account"
                " AND created_at = (SELECT min(created_at) FROM messages WHERE account_id = :account)"
            ),
            {"account": account_id},
        ).scalars()
        assert set(first_stored) == {f"Backlog {n:02d}" for n in range(7, 12)}

    queued = tasks_of(runtime, account_id)
    assert [task.params for task in queued] == [{"folders": ["INBOX"]}]
    assert wait_task(client, user, queued[0].id)["status"] == "success"
    assert set(inbox_subjects(client, user, account_id)) == {f"Backlog {n:02d}" for n in range(12)}


def test_a_change_reported_while_a_sync_runs_is_fetched_by_a_sync_after_it(
    client, live_runtime, user, dovecot, mail_user, worker
):
    runtime = live_runtime
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    # A sync of every folder is running: its task says so and it holds the account.
    running = add_task(runtime, user, account_id, progress=50)
    lock = AccountLock(runtime.db, account_id)
    assert lock.acquire()
    try:
        # The server reports new mail; the running sync may have looked at the Inbox before it came.
        dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Arrived mid-sync")))
        assert refresh_folder(runtime, user.principal, account_id, "INBOX") is None
        after = [task for task in tasks_of(runtime, account_id) if task.id != running]
        assert [(task.status, task.params) for task in after] == [(TaskStatus.PENDING, {"folders": ["INBOX"]})]
    finally:
        lock.release()
        with runtime.db.maintenance_session() as session:
            session.execute(update(Task).where(Task.id == running).values(status=TaskStatus.SUCCESS))
    assert wait_task(client, user, after[0].id)["status"] == "success"
    assert "Arrived mid-sync" in inbox_subjects(client, user, account_id)


def stalling_server(answers: int) -> ScriptedImapServer:
    """Logs anyone in and answers the first ``answers`` CAPABILITY commands, then nothing."""
    left = [answers]

    def answer(tag: bytes, command: bytes) -> bytes:
        if command == b"LOGIN":
            return tag + b" OK logged in\r\n"
        if command == b"CAPABILITY" and left[0] > 0:
            left[0] -= 1
            return b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n"
        return b""

    return ScriptedImapServer(answer, greeting=b"* OK [CAPABILITY IMAP4rev1 IDLE] ready")


@pytest.mark.parametrize("answers", [0, 1], ids=["after-the-greeting", "after-the-login"])
def test_a_server_that_stops_answering_fails_the_watch_in_its_timeout(backing, answers):
    server = stalling_server(answers)
    settings = replace(backing, imap_timeout_seconds=2, destinations=TEST_DESTINATIONS)
    mail_server = MailServer(Protocol.IMAP, "127.0.0.1", server.port, "none", "user", "secret")
    started = time.monotonic()
    with pytest.raises(ConnectionFailed, match="Timeout"):
        asyncio.run(asyncio.wait_for(IdleConnection.open(mail_server, settings, client_context(None)), 30))
    assert time.monotonic() - started < 10
    server.close()


LOGINS = {
    "non-ascii-password": ("", "Pässwort123", False),
    "non-ascii-user-name": ("jörg-", "Pässwort123", False),
    "user-name-needing-quotes": ('domain\\ "first" last-', 'pa"ss\\word 123', False),
    "literal-without-auth-plain": ("domain\\jörg-", "Pässwort123", True),
}


@pytest.mark.parametrize("case", LOGINS)
def test_the_watch_logs_in_with_any_user_name_and_password(backing, dovecot, case):
    # aioimaplib's login() sends the user name unquoted and a non-ASCII password as raw UTF-8
    # inside a quoted string; the watcher logs in as sync does.
    prefix, password, hide_plain = LOGINS[case]
    mail_user = dovecot.add_user(f"{prefix}{secrets.token_hex(4)}", password)
    settings = replace(backing, destinations=TEST_DESTINATIONS)
    server = MailServer(Protocol.IMAP, dovecot.host, dovecot.imaps_port, "tls", mail_user.name, password)
    proxy = None
    if hide_plain:
        proxy = CapabilityHidingProxy(dovecot.imap_port, hide=["AUTH=PLAIN"])
        server = MailServer(Protocol.IMAP, "127.0.0.1", proxy.port, "none", mail_user.name, password)

    async def watch() -> bool:
        connection = await IdleConnection.open(server, settings, client_context(dovecot.ca_file))
        try:
            return connection.supports_idle
        finally:
            await connection.close()

    assert asyncio.run(asyncio.wait_for(watch(), 30))
    if proxy is not None:
        proxy.close()
        sent = b"".join(proxy.sent)
        assert b" LOGIN {" in sent and b"AUTHENTICATE" not in sent


def server_listing_inbox_as(name: bytes, raw: bytes) -> ScriptedImapServer:
    """One message in the inbox of a server that lists it as ``name`` (RFC 3501 5.1: any case of INBOX)."""

    def answer(tag: bytes, command: bytes) -> bytes:
        line = server.lines[-1].upper()
        untagged = b""
        if command == b"CAPABILITY":
            untagged = b"* CAPABILITY IMAP4rev1\r\n"
        elif command == b"LIST":
            untagged = b'* LIST (\\HasNoChildren) "/" ' + name + b"\r\n"
        elif command == b"STATUS":
            untagged = b"* STATUS " + name + b" (MESSAGES 1 UIDNEXT 2 UIDVALIDITY 5 UNSEEN 1)\r\n"
        elif command == b"EXAMINE":
            untagged = b"* 1 EXISTS\r\n* OK [UIDVALIDITY 5] ok\r\n* OK [UIDNEXT 2] ok\r\n"
        elif b" SEARCH" in line:
            untagged = b"* SEARCH 1\r\n"
        elif b"RFC822.SIZE" in line:
            untagged = b"* 1 FETCH (UID 1 RFC822.SIZE %d)\r\n" % len(raw)
        elif b"BODY.PEEK[]" in line:
            meta = b'* 1 FETCH (UID 1 FLAGS () INTERNALDATE "02-Mar-2026 10:00:00 +0000" BODY[] {%d}\r\n' % len(raw)
            untagged = meta + raw + b")\r\n"
        elif command == b"LOGOUT":
            untagged = b"* BYE\r\n"
        return untagged + tag + b" OK done\r\n"

    server = ScriptedImapServer(answer)
    return server


def test_a_reported_change_reaches_an_inbox_the_server_lists_in_another_case(client, live_runtime, user):
    # The watcher reports changes of "INBOX"; a server listing "Inbox" (the same folder: INBOX is
    # case-insensitive) had nothing refreshed, as the folder was looked for by its exact name.
    server = server_listing_inbox_as(b"Inbox", to_bytes(plain_message("Into the Inbox")))
    body = scripted_account(server.port, "Inbox in another case")
    account_id = create_account(client, user, body)
    # The folders as the account's first sync left them.
    store = MailStore(live_runtime.db, live_runtime.objects, user.principal, account_id)
    store.reconcile_folders(remote_folders([b'(\\HasNoChildren) "/" Inbox']))

    result = refresh_folder(live_runtime, user.principal, account_id, "INBOX")
    server.close()
    assert result is not None and result.folders_synced == 1 and result.messages_added == 1, result
    # The folder was known: no LIST was needed to find it.
    assert not [line for line in server.lines if line.split()[1].upper() == b"LIST"]
    [inbox] = store.folders().values()
    assert inbox.name == "Inbox" and inbox.uidnext == 2
    listed = client.get(f"/api/{account_id}/folders/{inbox.id}/messages", headers=user.headers).json()
    assert [m["subject"] for m in listed["messages"]] == ["Into the Inbox"]


def test_leases_are_renewed_while_every_refresh_thread_waits_on_a_slow_server(backing):
    watcher_ = Watcher(replace(backing, watch_threads=2))
    slow_servers = threading.Event()

    async def one_round() -> None:
        try:
            for _ in range(2):
                watcher_.executor.submit(slow_servers.wait, 60)
            # A whole round (account list, watchers, renewal, claims) goes on beside them.
            await asyncio.wait_for(watcher_.balance(), 10)
        finally:
            slow_servers.set()
            await watcher_.shutdown()

    asyncio.run(one_round())


def test_a_reported_change_does_not_wait_behind_catch_ups(client, user, dovecot, mail_user, backing):
    # A server that takes connections and never greets: each catch-up on it holds a thread for
    # the whole IMAP timeout, as a herd of accounts taken over from a dead watcher would.
    silent = socket.create_server(("127.0.0.1", 0), backlog=16)
    port = silent.getsockname()[1]
    settings = replace(backing, ca_file=dovecot.ca_file, watch_threads=4, imap_timeout_seconds=60)
    watcher_ = Watcher(settings)

    def watchable(body: dict) -> Watchable:
        return Watchable(create_account(client, user, body), user.principal, datetime.now(UTC), 3600)

    slow = [
        watchable(
            imap_account(
                dovecot,
                mail_user,
                hostname="127.0.0.1",
                port=port,
                encryption="none",
                emailAddress=f"slow{n}@example.com",
            )
        )
        for n in range(settings.watch_threads)
    ]
    watched = watchable(imap_account(dovecot, mail_user))
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Reported at once")))

    async def scenario() -> float:
        catch_ups = [asyncio.create_task(watcher_.catch_up(account)) for account in slow]
        try:
            await asyncio.sleep(1)  # every catch-up that may run is waiting on the silent server
            started = time.monotonic()
            await asyncio.wait_for(watcher_.refresh(watched), 30)
            return time.monotonic() - started
        finally:
            silent.close()  # the waiting connections are reset and their threads come back
            await asyncio.gather(*catch_ups, return_exceptions=True)
            await watcher_.shutdown()

    took = asyncio.run(scenario())
    assert took < 30
    assert "Reported at once" in inbox_subjects(client, user, watched.account_id)


@pytest.mark.parametrize("how", ["kicked", "shut-down", "kicked-before-idle"])
def test_an_idle_the_server_ends_with_bye_fails_the_watch_at_once(backing, dovecot, mail_user, how):
    # Dovecot says "* BYE" and hangs up on an IDLE client it kicks or when it shuts down (as
    # servers do at an autologout). The watch must notice then, not when the IDLE is due for
    # renewal (up to 25 minutes later), deaf to new mail all along; and an IDLE started after a
    # hang-up (one that came while a change was fetched) must not wait for ever for its "+".
    settings = replace(backing, destinations=TEST_DESTINATIONS)
    server = MailServer(Protocol.IMAP, dovecot.host, dovecot.imaps_port, "tls", mail_user.name, mail_user.password)

    def hang_up() -> None:
        if how.startswith("kicked"):
            subprocess.run(["doveadm", "-c", str(dovecot.config_file), "kick", mail_user.name], check=True)
        else:
            dovecot.stop()

    async def idle_until_cut_off() -> float:
        connection = await IdleConnection.open(server, settings, client_context(dovecot.ca_file))
        try:
            if how == "kicked-before-idle":
                await asyncio.to_thread(hang_up)
                await asyncio.sleep(1)  # the hang-up has arrived
            waiting = asyncio.create_task(connection.wait_for_change(renew=600))
            if how != "kicked-before-idle":
                await asyncio.sleep(1)  # in IDLE now
                await asyncio.to_thread(hang_up)
            cut_off = time.monotonic()
            with pytest.raises(ConnectionFailed):
                await asyncio.wait_for(waiting, 30)
            return time.monotonic() - cut_off
        finally:
            await connection.close()

    took = asyncio.run(idle_until_cut_off())  # a stopped Dovecot is started again after the test
    assert took < 5, took


def test_a_database_outage_longer_than_a_lease_does_not_let_the_leases_lapse(client, runtime, user, backing):
    # The account list comes from the database, the leases from Redis. A database that is away
    # for longer than a lease (a failover, a restart) must not cost the watcher its leases: other
    # watchers would take its accounts while it still watches them, and when the database came
    # back it would find every lease lost and start every watch over.
    watcher_ = Watcher(replace(backing, watch_lease_seconds=LEASE_SECONDS))
    account_id = create_account(client, user, scripted_account(1, "Watched through an outage"))
    account = Watchable(account_id, user.principal, datetime.now(UTC), 3600)
    leases = Leases(runtime.redis, "probe")

    async def scenario() -> list[str | None]:
        # A watch under way (a stand-in for its IDLE connection) and the lease it holds.
        watch = asyncio.create_task(asyncio.sleep(3600))
        watcher_.watching[account_id] = (account, watch)
        assert watcher_.leases.claim([account_id], 1) == [account_id]
        reachable = watcher_.runtime.db
        watcher_.runtime.db = Database("postgresql://nobody@127.0.0.1:1/gone", backing.db_app_role)
        holders = []
        try:
            # Rounds as the watcher runs them, one every third of a lease, over three leases.
            for _ in range(9):
                with pytest.raises(Exception, match="connection"):
                    await watcher_.balance()
                holders.append(leases.holder(account_id))
                await asyncio.sleep(LEASE_SECONDS / 3)
        finally:
            watcher_.runtime.db.dispose()
            watcher_.runtime.db = reachable
            watcher_.watching.pop(account_id)
            watch.cancel()
            await watcher_.shutdown()
        return holders

    assert asyncio.run(scenario()) == [watcher_.name] * 9


def test_a_watcher_cut_off_from_redis_stops_its_watches_when_their_leases_run_out(runtime, user, backing):
    # A watcher that cannot reach Redis cannot renew its leases; once they run out another
    # watcher takes the accounts. Watching them on regardless would watch each account twice.
    watcher_ = Watcher(replace(backing, watch_lease_seconds=LEASE_SECONDS))
    account_id = f"cut-off-{secrets.token_hex(4)}"
    account = Watchable(account_id, user.principal, datetime.now(UTC), 3600)
    other = Leases(runtime.redis, "another-watcher", ttl=LEASE_SECONDS)

    async def scenario() -> tuple[list[str], bool]:
        watch = asyncio.create_task(asyncio.sleep(3600))  # a stand-in for its IDLE connection
        watcher_.watching[account_id] = (account, watch)
        assert watcher_.leases.claim([account_id], 1) == [account_id]
        assert watcher_.leases.renew([account_id]) == {account_id}
        # The watcher's Redis client now reaches nothing (a network partition, Redis away).
        client = watcher_.leases.redis
        reachable, client.connection_pool = client.connection_pool, redis.ConnectionPool(host="127.0.0.1", port=1)
        try:
            for _ in range(3 * 3):  # rounds, one every third of a lease, over three leases
                await watcher_.round()
                other.claim([account_id], 1)  # another watcher takes what is free
                await asyncio.sleep(LEASE_SECONDS / 3)
            return list(watcher_.watching), watch.cancelled()
        finally:
            client.connection_pool.disconnect()
            client.connection_pool = reachable
            watch.cancel()
            await watcher_.shutdown()
            other.release([account_id])

    still_watching, stopped = asyncio.run(scenario())
    assert still_watching == [] and stopped


def test_an_account_whose_server_has_no_idle_is_let_go_for_the_interval_sync(
    client, runtime, user, backing, monkeypatch
):
    # Its watch ends at once (no IDLE: the scheduler's interval sync serves it), but the account
    # stayed among the watched with its lease renewed, counted in this watcher's share, and the
    # hour's pause before asking the server again never came into play.
    def answer(tag: bytes, command: bytes) -> bytes:
        if command == b"CAPABILITY":
            return b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK done\r\n"
        if command == b"LOGOUT":
            return b"* BYE\r\n" + tag + b" OK done\r\n"
        return tag + b" OK done\r\n"

    server = ScriptedImapServer(answer)
    account_id = create_account(client, user, scripted_account(server.port, "No IDLE", isSyncEnabled=True))
    account = Watchable(account_id, user.principal, datetime.now(UTC), 3600)
    watcher_ = Watcher(replace(backing, watch_lease_seconds=LEASE_SECONDS, destinations=TEST_DESTINATIONS))
    monkeypatch.setattr(watcher_module, "watchable_accounts", lambda _runtime: {account_id: account})
    leases = Leases(runtime.redis, "probe")

    async def scenario() -> tuple[list[str], str | None]:
        try:
            await watcher_.balance()
            assert account_id in watcher_.watching and leases.holder(account_id) == watcher_.name
            await asyncio.wait_for(asyncio.shield(watcher_.watching[account_id][1]), 20)  # ends: no IDLE
            for _ in range(2):
                await watcher_.balance()
            return list(watcher_.watching), leases.holder(account_id)
        finally:
            await watcher_.shutdown()

    assert asyncio.run(scenario()) == ([], None)
    server.close()


def test_a_watcher_whose_clock_runs_ahead_still_counts_the_others(runtime, monkeypatch):
    # Heartbeats were scored by each watcher's own clock: one ahead by more than a lease took
    # every other watcher for dead and claimed a share of the accounts as if it were alone.
    first, second = (Leases(runtime.redis, f"clock-{secrets.token_hex(4)}", ttl=LEASE_SECONDS) for _ in range(2))
    counted = first.live_watchers()
    monkeypatch.setattr(time, "time", lambda real=time.time: real() + 10 * LEASE_SECONDS)
    try:
        assert second.live_watchers() == counted + 1
        assert runtime.redis.zscore("email_service:watchers", first.watcher_id) is not None
    finally:
        monkeypatch.undo()
        runtime.redis.zrem("email_service:watchers", first.watcher_id, second.watcher_id)
