"""Job functions RQ runs. A job flows: queue -> mail protocol code (sync) -> models."""

from __future__ import annotations

import logging
import time
import uuid

from rq import get_current_job

from email_service.crypto import CredentialError
from email_service.protocols.errors import MailServerError
from email_service.protocols.smtp import PermanentDeliveryError, SmtpSession
from email_service.queue.context import job_runtime
from email_service.queue.locks import AccountLock
from email_service.runtime import Runtime
from email_service.sync import outgoing
from email_service.sync.accounts import SyncTarget, load_target, mark_syncing
from email_service.sync.imap_sync import ImapSync
from email_service.sync.pop3_sync import Pop3Sync
from email_service.sync.result import SyncResult
from email_service.sync.store import MailStore
from email_service.sync.writeback import load_pending, write_back
from email_service.tenancy import Principal

log = logging.getLogger(__name__)


class TaskFailed(Exception):
    """A failure whose message is meant for the user (it is what the status API shows)."""


class JobProgress:
    """Writes progress to the job's meta, at most twice a second, so polling sees it move.

    Progress never goes back: a job resumed after its worker died starts counting from zero
    again, but the task keeps showing what was already reached until the new run passes it.
    """

    def __init__(self) -> None:
        self.job = get_current_job()
        self._last = 0.0
        self._value = int(self.job.meta.get("progress", 0)) if self.job is not None else 0

    def __call__(self, percent: int) -> None:
        percent = max(0, min(100, percent))
        now = time.monotonic()
        if self.job is None or percent <= self._value or (now - self._last < 0.5 and percent < 100):
            return
        self._value, self._last = percent, now
        self.job.meta["progress"] = percent
        self.job.save_meta()

    def failed(self, message: str) -> TaskFailed:
        """Record ``message`` as the task's error and return the exception to raise."""
        if self.job is not None:
            self.job.meta["error"] = message
            self.job.save_meta()
        return TaskFailed(message)


def sync_account(
    account_id: str, tenant_id: str, user_id: str, force: bool = False, folders: list[str] | None = None
) -> dict:
    """Sync one account. RQ retries it only when its worker died mid-run, never after it failed."""
    progress = JobProgress()
    _count_attempt(progress)
    try:
        return _sync_account(progress, account_id, Principal(uuid.UUID(tenant_id), uuid.UUID(user_id)), force, folders)
    except Exception:
        # The user has been told why; running the same failure again would only repeat it.
        _no_more_retries(progress)
        raise


def _sync_account(
    progress: JobProgress, account_id: str, principal: Principal, force: bool, folders: list[str] | None
) -> dict:
    runtime = job_runtime()
    lock = AccountLock(runtime.redis, account_id)
    if not lock.acquire():
        raise progress.failed("another sync of this account is already running")
    try:
        try:
            target = load_target(runtime.db, runtime.cipher, principal, account_id)
        except CredentialError:
            raise progress.failed("the stored password cannot be decrypted; set the account's password again") from None
        if target is None:
            raise progress.failed("the account no longer exists or is disabled")
        mark_syncing(runtime.db, principal, account_id, True)
        succeeded = False
        try:
            result = _run_sync(runtime, principal, target, progress, force=force, folders=folders)
            succeeded = True
        except MailServerError as exc:
            raise progress.failed(str(exc)) from None
        finally:
            mark_syncing(runtime.db, principal, account_id, False, succeeded=succeeded)
        log.info("synced account %s: %s", account_id, result.as_dict())
        return result.as_dict()
    finally:
        lock.release()


def _run_sync(
    runtime: Runtime,
    principal: Principal,
    target: SyncTarget,
    progress: JobProgress,
    *,
    force: bool,
    folders: list[str] | None,
) -> SyncResult:
    store = MailStore(runtime.db, runtime.objects, principal, target.id)
    with target.session(runtime.settings.ca_file, runtime.settings.destinations) as session:
        if target.protocol == "imap":
            return ImapSync(store, session, progress, force=force, only_folders=folders).run()
        return Pop3Sync(store, session, progress).run()


class AccountBusy(Exception):
    """A sync holds the account; RQ retries the job later."""


def writeback_message(account_id: str, tenant_id: str, user_id: str, message_id: str) -> dict:
    """Write one message's changed flags (and spam moves) to its IMAP server."""
    runtime = job_runtime()
    principal = Principal(uuid.UUID(tenant_id), uuid.UUID(user_id))
    progress = JobProgress()
    lock = AccountLock(runtime.redis, account_id)
    if not lock.acquire():
        # Not a failure: the retry policy brings the job back once the sync is done.
        progress.failed("waiting for a running sync of this account to finish")
        raise AccountBusy(account_id)
    try:
        target = load_target(runtime.db, runtime.cipher, principal, account_id)
        change = load_pending(runtime.db, principal, message_id) if target is not None else None
        if target is None or change is None or target.protocol != "imap":
            return {"result": "nothing to write"}
        try:
            with target.session(runtime.settings.ca_file, runtime.settings.destinations) as session:
                outcome = write_back(runtime.db, principal, session, change)
        except MailServerError as exc:
            # Recorded for the status API; raised again so the retry policy tries later.
            progress.failed(str(exc))
            raise
        return {"result": outcome}
    finally:
        lock.release()


DELIVERED_KEY = "email_service:delivered:{message_id}"
DELIVERED_TTL = 30 * 24 * 3600


def _count_attempt(progress: JobProgress) -> None:
    if progress.job is not None:
        progress.job.meta["attempts"] = int(progress.job.meta.get("attempts", 0)) + 1
        progress.job.save_meta()


def _retries_left(progress: JobProgress) -> bool:
    return bool(progress.job is not None and progress.job.retries_left)


def _no_more_retries(progress: JobProgress) -> None:
    # The worker reads retries_left from this very job object when the exception arrives.
    if progress.job is not None:
        progress.job.retries_left = 0


def _give_up(progress: JobProgress, message: str) -> TaskFailed:
    _no_more_retries(progress)
    return progress.failed(message)


def deliver_message(message_id: str, account_id: str, tenant_id: str, user_id: str) -> dict:
    """Deliver a message written through the API over SMTP, then file the copy in Sent."""
    runtime = job_runtime()
    principal = Principal(uuid.UUID(tenant_id), uuid.UUID(user_id))
    progress = JobProgress()
    _count_attempt(progress)
    try:
        message = outgoing.load(runtime.db, runtime.cipher, runtime.objects, principal, message_id)
    except CredentialError:
        raise _give_up(progress, "the stored SMTP password cannot be decrypted; set it again") from None
    if message is None:
        raise _give_up(progress, "the message or its account no longer exists")
    delivered_key = DELIVERED_KEY.format(message_id=message_id)
    result: dict = {"delivered": True, "refusedRecipients": {}}
    # A message the server accepted is never sent again, whatever happens after.
    if message.status != "sent" and not runtime.redis.exists(delivered_key):
        if message.smtp is None:
            raise _give_up(progress, "the account has no SMTP server configured")
        smtp = message.smtp
        try:
            with SmtpSession(
                smtp.hostname,
                smtp.port,
                smtp.encryption,
                smtp.username,
                smtp.password,
                ca_file=runtime.settings.ca_file,
                destinations=runtime.settings.destinations,
            ) as session:
                outcome = session.send(message.envelope_from, message.recipients, message.data)
        except PermanentDeliveryError as exc:
            outgoing.set_status(runtime.db, principal, message_id, "failed", str(exc))
            raise _give_up(progress, str(exc)) from None
        except MailServerError as exc:
            if not _retries_left(progress):
                outgoing.set_status(runtime.db, principal, message_id, "failed", str(exc))
            raise progress.failed(str(exc)) from None
        runtime.redis.set(delivered_key, 1, ex=DELIVERED_TTL)
        outgoing.set_status(runtime.db, principal, message_id, "sent")
        result["refusedRecipients"] = {addr: f"{code} {text}" for addr, (code, text) in outcome.refused.items()}
    progress(60)
    result["sentCopy"] = _file_copy(runtime, principal, account_id, message, ("\\Seen",))
    progress(100)
    return result


def append_draft(message_id: str, account_id: str, tenant_id: str, user_id: str) -> dict:
    """Put a draft saved through the API into the server's Drafts folder with \\Draft."""
    runtime = job_runtime()
    principal = Principal(uuid.UUID(tenant_id), uuid.UUID(user_id))
    progress = JobProgress()
    _count_attempt(progress)
    message = outgoing.load(runtime.db, runtime.cipher, runtime.objects, principal, message_id)
    if message is None:
        raise _give_up(progress, "the draft or its account no longer exists")
    try:
        filed = _file_copy(runtime, principal, account_id, message, ("\\Draft", "\\Seen"), raise_errors=True)
    except MailServerError as exc:
        raise progress.failed(str(exc)) from None
    return {"draftCopy": filed}


def _file_copy(
    runtime: Runtime,
    principal: Principal,
    account_id: str,
    message: outgoing.Outgoing,
    flags: tuple[str, ...],
    *,
    raise_errors: bool = False,
) -> str:
    """APPEND the message to its folder on the IMAP server; returns what happened, in words."""
    if message.uid is not None:
        return "already on the server"
    target = load_target(runtime.db, runtime.cipher, principal, account_id)
    if target is None or target.protocol != "imap":
        return "kept here only (POP3 has no server folders)"
    lock = _wait_for_lock(runtime, account_id)
    try:
        with target.session(runtime.settings.ca_file, runtime.settings.destinations) as session:
            if session.gmail:
                return "filed by the server itself"  # Gmail keeps its own copy of what it sends
            session.ensure_folder(message.folder_name)
            appended = session.append(message.folder_name, message.data, flags, message.date)
    except MailServerError as exc:
        if raise_errors:
            raise
        log.warning("sent message %s not filed on the server: %s", message.message_id, exc)
        return f"not filed on the server: {exc}"
    finally:
        lock.release()
    if appended is not None:
        # The row takes the server's UID, so the next sync sees one copy, not two.
        outgoing.set_uid(runtime.db, principal, message.message_id, appended[1], len(message.data))
    return f"filed in {message.folder_name}"


def _wait_for_lock(runtime: Runtime, account_id: str, timeout: float = 120.0) -> AccountLock:
    """The account's sync lock, waited for: a sync must not fetch the copy before its row has the UID."""
    deadline = time.monotonic() + timeout
    while True:
        lock = AccountLock(runtime.redis, account_id)
        if lock.acquire():
            return lock
        if time.monotonic() > deadline:
            raise AccountBusy(account_id)
        time.sleep(0.5)
