"""Jobs of the incoming side: sync an account, write a message's change back. job -> protocol -> model."""

from __future__ import annotations

import logging
from typing import Any

from email_service.crypto import CredentialError
from email_service.mailbox.imap_sync import ImapSync
from email_service.mailbox.moves import resume_server_moves
from email_service.mailbox.pop3_sync import Pop3Sync
from email_service.mailbox.schedule import record_failure, record_success
from email_service.mailbox.server_moves import write_moves
from email_service.mailbox.store import MailStore
from email_service.mailbox.writeback import FolderRenumbered, load_pending, stranded, write_back
from email_service.models import TaskKind
from email_service.protocols.errors import MailServerError
from email_service.protocols.servers import Protocol
from email_service.queue import tasks
from email_service.queue.runner import TaskContext
from email_service.queue.tasks import TaskFailed, TaskRetry
from email_service.runtime import Runtime
from email_service.services.servers import load_servers
from email_service.tenancy import Principal

log = logging.getLogger(__name__)
UNDECRYPTABLE = "the stored password cannot be decrypted; set the account's password again"


def run_sync(context: TaskContext) -> dict[str, Any]:
    """Sync one account (the runner holds it). A failure is not retried as a task: the account's backoff decides."""
    runtime, principal, account_id = context.runtime, context.principal, context.account_id
    assert account_id is not None and context.holds_account
    try:
        servers = load_servers(runtime.db, runtime.cipher, principal, account_id)
    except CredentialError:
        raise TaskFailed(UNDECRYPTABLE, permanent=True) from None
    if servers is None:
        raise TaskFailed("the account no longer exists or is disabled", permanent=True)
    folders = context.params.get("folders")
    store = MailStore(runtime.db, runtime.objects, principal, account_id)
    try:
        with servers.incoming.session(runtime.settings) as session:
            if servers.incoming.protocol is Protocol.IMAP:
                result = ImapSync(
                    store, session, context.progress, force=bool(context.params.get("force")), only_folders=folders
                ).run()
            else:
                result = Pop3Sync(store, session, context.progress).run()
    except MailServerError as exc:
        raise TaskFailed(str(exc), permanent=exc.permanent) from None
    record_success(runtime.db, principal, account_id, full=not folders)
    if servers.incoming.protocol is Protocol.IMAP:
        resume_stranded_writes(runtime, principal, account_id)
    log.info("synced account %s: %s", account_id, result.as_dict())
    return result.as_dict()


def resume_stranded_writes(runtime: Runtime, principal: Principal, account_id: str) -> None:
    """Queue again what waits for the server after its write-back gave up, now the server answers.

    Called after a sync that reached the server: a sync job's, or a watcher's look at every
    folder (a watched account's automatic sync). The sync stands whatever happens here; what is
    not queued now is the next one's.
    """
    try:
        left = stranded(runtime.db, principal, account_id)
        for message_id in left:
            tasks.enqueue(runtime, TaskKind.WRITEBACK, principal, account_id=account_id, message_id=message_id)
        resume_server_moves(runtime, principal, account_id)
    except Exception as exc:  # noqa: BLE001 - the next sync looks again
        log.warning("account %s: stranded write-backs not queued again: %s", account_id, type(exc).__name__)
        return
    if left:
        log.info("account %s: %d stranded write-backs queued again", account_id, len(left))


def sync_failed(context: TaskContext, message: str, permanent: bool) -> None:
    """However a sync failed, the account shows why and its automatic sync backs off."""
    if context.account_id is not None:
        record_failure(
            context.runtime.db,
            context.principal,
            context.account_id,
            message,
            permanent=permanent,
            attempted_at=context.started_at,
        )


def run_writeback(context: TaskContext) -> dict[str, Any]:
    """Write one message's changed flags (and spam moves) to its IMAP server (the runner holds the account).

    Without a message: the account's moves and deletions made through the API (``server_moves``).
    """
    runtime, principal, account_id = context.runtime, context.principal, context.account_id
    assert account_id is not None and context.holds_account
    try:
        servers = load_servers(runtime.db, runtime.cipher, principal, account_id)
    except CredentialError:
        raise TaskFailed(UNDECRYPTABLE, permanent=True) from None
    try:
        if context.message_id is None:
            if servers is None:
                return {"result": "nothing to write"}
            return write_moves(runtime, principal, account_id, servers)
        change = load_pending(runtime.db, principal, context.message_id) if servers is not None else None
        if servers is None or change is None or servers.incoming.protocol is not Protocol.IMAP:
            return {"result": "nothing to write"}
        with servers.incoming.imap(runtime.settings) as session:
            outcome = write_back(runtime.db, principal, session, change)
    except FolderRenumbered as exc:
        # What waits to be written is dropped with the folder's old rows by the sync queued here,
        # which brings the folder in again as the server numbers it now.
        tasks.enqueue(runtime, TaskKind.SYNC, principal, account_id=account_id, params={"folders": exc.folders})
        return {"result": f"nothing written: {exc}"}
    except MailServerError as exc:
        if exc.permanent:
            raise TaskFailed(str(exc), permanent=True) from None
        raise TaskRetry(str(exc)) from None
    return {"result": outcome}
