"""Bringing one folder up to date at once, when its server reports a change (IMAP IDLE).

Runs in the watcher's threads, not as a queued job: no process is forked per change. It holds
the account like any job does; if a job holds it (a sync or write-back is running), the change
becomes a sync task of that folder instead, queued to run after it, so nothing is missed.

The work one change can cost a watcher thread is bounded: a folder with more new mail than
``LIVE_MAX_NEW`` (an account just added, or a watcher that was down for a while) gets its newest
messages at once and the older rest from a queued sync, so one account's backlog never keeps
the threads every other account's changes wait for. Parsing stays in the thread: the watcher is
a process full of threads and connections, not one to fork parse workers from.
"""

from __future__ import annotations

from email_service.crypto import CredentialError
from email_service.mailbox.imap_sync import ImapSync
from email_service.mailbox.jobs import resume_stranded_writes
from email_service.mailbox.result import SyncResult
from email_service.mailbox.schedule import record_success
from email_service.mailbox.store import MailStore
from email_service.models import TaskKind
from email_service.protocols.servers import Protocol
from email_service.queue import tasks
from email_service.queue.locks import AccountLock
from email_service.runtime import Runtime
from email_service.services.servers import load_servers
from email_service.tenancy import Principal

# New messages one refresh stores per folder, newest first: enough for any burst of new mail,
# a few seconds of one thread at most.
LIVE_MAX_NEW = 100


def refresh_folder(
    runtime: Runtime,
    principal: Principal,
    account_id: str,
    folder: str | None = "INBOX",
    *,
    max_new: int = LIVE_MAX_NEW,
) -> SyncResult | None:
    """Fetch what changed in ``folder`` (every folder with None) now; None when it was handed to a queued sync.

    Every folder at once is the account's automatic sync done here, cheaply: unchanged folders
    cost one STATUS each, and the account's next scheduled sync moves out as after any sync.
    Beyond ``max_new`` new messages in a folder, the older ones are left to a queued sync.
    """
    lock = AccountLock(runtime.db, account_id)
    if not lock.acquire():
        _queue_sync(runtime, principal, account_id, [folder] if folder else None)
        return None
    try:
        result = _refresh(runtime, principal, account_id, folder, max_new)
    finally:
        lock.release()
    if result is not None and result.folders_left:
        _queue_sync(runtime, principal, account_id, result.folders_left)
    if result is not None and folder is None:
        # A watched account's automatic sync is this look, not a sync job: it resumes the
        # write-backs that gave up as a job would.
        resume_stranded_writes(runtime, principal, account_id)
    return result


def _queue_sync(runtime: Runtime, principal: Principal, account_id: str, folders: list[str] | None) -> None:
    # Never joined to a sync already running: it may have looked at the folder before the change.
    params = {"folders": folders} if folders else {}
    tasks.enqueue(runtime, TaskKind.SYNC, principal, account_id=account_id, params=params, join_running=False)


def _refresh(
    runtime: Runtime, principal: Principal, account_id: str, folder: str | None, max_new: int
) -> SyncResult | None:
    try:
        servers = load_servers(runtime.db, runtime.cipher, principal, account_id)
    except CredentialError:
        return None
    if servers is None or servers.incoming.protocol is not Protocol.IMAP:
        return None
    store = MailStore(runtime.db, runtime.objects, principal, account_id)
    with servers.incoming.imap(runtime.settings) as session:
        result = ImapSync(
            store,
            session,
            lambda _percent: None,
            only_folders=[folder] if folder else None,
            list_folders=False,
            max_new=max_new,
            parse_pool=False,
        ).run()
    if folder is None and not result.folders_left:
        record_success(runtime.db, principal, account_id, full=True)
    return result
