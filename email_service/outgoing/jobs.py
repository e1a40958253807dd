"""Jobs of the outgoing side: deliver a message over SMTP, file copies in Sent and Drafts.

A message is sent at most once by this service. Its row says how far delivery got:
``queued`` (nothing accepted yet, safe to try again), ``sending`` (the data is going out; set
and committed before the first byte of it is sent), ``sent``, ``failed`` or ``ambiguous`` (the
whole message went out and no reply came). A run that finds ``sending`` knows a previous run
was lost while the server may have been accepting the message: that is ambiguous too, and
only an explicit request (``retrySend``) sends it again.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from sqlalchemy.exc import OperationalError

from email_service.crypto import CredentialError
from email_service.folders.roles import adopt_server_folder, role_folder_on_server
from email_service.mailbox import moves
from email_service.models import DeliveryStatus
from email_service.outgoing import delivery
from email_service.protocols.errors import ConnectionFailed, MailServerError
from email_service.protocols.imap import ImapSession
from email_service.protocols.servers import Protocol
from email_service.protocols.smtp import AmbiguousDeliveryError, DataWithheld, PermanentDeliveryError
from email_service.queue.locks import AccountLock
from email_service.queue.runner import TaskContext
from email_service.queue.tasks import TaskDeferred, TaskFailed, TaskRetry
from email_service.services.servers import load_servers
from email_service.storage import UNREACHABLE, ObjectNotFound

log = logging.getLogger(__name__)
FINAL = (DeliveryStatus.SENT, DeliveryStatus.AMBIGUOUS, DeliveryStatus.FAILED)
ACCOUNT_DISABLED = "the account is disabled; enable it and send the message again"
NOT_QUEUED = tuple(status for status in DeliveryStatus if status is not DeliveryStatus.QUEUED)
LOST_WHILE_SENDING = (
    "the worker sending it stopped after the message data went out: the server may or may not have "
    "accepted it, so it is not sent again unless asked to"
)


def _load(context: TaskContext) -> delivery.Outgoing:
    runtime = context.runtime
    assert context.message_id is not None
    try:
        message = delivery.load(runtime.db, runtime.cipher, runtime.objects, context.principal, context.message_id)
    except CredentialError:
        raise TaskFailed("the stored SMTP password cannot be decrypted; set it again", permanent=True) from None
    except ValueError as exc:  # the stored message cannot be built (checked at compose; data changed since)
        raise TaskFailed(f"the message cannot be built: {exc}", permanent=True) from None
    except ObjectNotFound:
        raise TaskFailed("a file the message attaches is no longer stored", permanent=True) from None
    except (OperationalError, *UNREACHABLE) as exc:
        # The database or object storage could not be reached for a moment. Nothing has been
        # sent yet, so the send policy's retries apply rather than failing the message.
        raise TaskRetry(f"the message could not be read now ({type(exc).__name__}); it is tried again") from None
    if message is None:
        raise TaskFailed("the message or its account no longer exists", permanent=True)
    return message


def run_send(context: TaskContext) -> dict[str, Any]:
    """Deliver a message written through the API over SMTP, then file the copy in Sent."""
    runtime, principal = context.runtime, context.principal
    if context.earlier_result.get("delivered"):
        return _after_delivery(context)
    message = _load(context)
    result: dict[str, Any] = {"delivered": True, "refusedRecipients": {}}
    if message.status is DeliveryStatus.SENDING:
        raise TaskFailed(LOST_WHILE_SENDING)  # the failure hook marks the message ambiguous
    if message.status in (DeliveryStatus.AMBIGUOUS, DeliveryStatus.FAILED):
        raise TaskFailed(f"the message is {message.status}; send it again explicitly to retry")
    if message.status is not DeliveryStatus.SENT:
        if not message.account_enabled:
            # Disabled after the message was queued: nothing goes out through it until it is
            # enabled again, and then only on the user's retrySend.
            raise TaskFailed(ACCOUNT_DISABLED, permanent=True)
        if message.smtp is None:
            raise TaskFailed("the account has no SMTP server configured", permanent=True)

        def data_goes_out() -> None:
            # Committed before the first byte of the data leaves: from here on, a lost worker or a
            # missing reply means the server may have the message. Only from queued, and only
            # while this run still holds the task: a run the reaper gave to another worker (this
            # one stalled past its heartbeat) must not send a second copy beside it.
            if not delivery.set_status(
                runtime.db,
                principal,
                message.message_id,
                DeliveryStatus.SENDING,
                unless=NOT_QUEUED,
                guard=context.still_running,
            ):
                raise DataWithheld("the message is no longer waiting to be sent by this run")

        def back_to_queued(error: str) -> None:
            delivery.set_status(runtime.db, principal, message.message_id, DeliveryStatus.QUEUED, error, unless=FINAL)

        try:
            with message.smtp.session(runtime.settings) as session:
                outcome = session.send(
                    message.envelope_from, message.recipients, message.data, before_data_end=data_goes_out
                )
        except DataWithheld as exc:
            # Another run holds the task now (whose outcome counts), or the message is gone.
            raise TaskFailed(str(exc)) from None
        # The failure hook (``send_failed``) marks the message failed or ambiguous, after this
        # run: once marked, the user may send it again, and nothing of this run may undo that.
        # Until then it says what is known: still sending (the outcome is unknown) or queued
        # (nothing was accepted).
        except AmbiguousDeliveryError as exc:
            raise TaskFailed(str(exc)) from None
        except PermanentDeliveryError as exc:
            back_to_queued(str(exc))
            raise TaskFailed(str(exc), permanent=True) from None
        except MailServerError as exc:
            # Nothing was accepted (the data did not go out whole, or the server said 4xx): safe to try again.
            back_to_queued(str(exc))
            raise TaskRetry(str(exc)) from None
        delivery.set_status(runtime.db, principal, message.message_id, DeliveryStatus.SENT)
        result["refusedRecipients"] = {addr: f"{code} {text}" for addr, (code, text) in outcome.refused.items()}
        # Kept with the task at once: a later try (filing the copy after a wait for the account,
        # a retry, a resumption after this worker died) reports what this one learnt.
        context.keep(result)
    context.progress(60)
    result["sentCopy"] = _file_sent_copy(context, message, result)
    context.progress(100)
    return result


def _after_delivery(context: TaskContext) -> dict[str, Any]:
    """A try after an earlier one delivered the message: only its copy for Sent is left.

    However that ends, the send succeeded: a message deleted meanwhile, a database that cannot
    be read on the last try, a password that no longer decrypts leave the copy unfiled, said in
    the result, and never turn a delivered message's task into a failure.
    """
    delivered = context.earlier_result
    try:
        message = _load(context)
        return {**delivered, "sentCopy": _file_sent_copy(context, message, delivered)}
    except TaskFailed as exc:
        return {**delivered, "sentCopy": f"not filed on the server: {exc.message}"}
    except TaskRetry as exc:
        unfiled = {**delivered, "sentCopy": f"not filed on the server: {exc.message}"}
        raise TaskRetry(exc.message, otherwise=exc.otherwise or unfiled) from None


def _file_sent_copy(context: TaskContext, message: delivery.Outgoing, delivered: dict[str, Any]) -> str:
    """File the delivered message's copy in Sent; a server that cannot take it now gets it from the next try.

    Nothing that stops the filing fails the task: the message went out.
    """
    try:
        return _file_copy(context, message, ("\\Seen",))
    except (MailServerError, OperationalError, *UNREACHABLE) as exc:
        # The next try files it (or finds the one this try stored without hearing back) and
        # sends nothing, as the message is sent. Once the tries run out the task still succeeds.
        why = (
            str(exc)
            if isinstance(exc, MailServerError)
            else f"the database or object storage could not be reached ({type(exc).__name__})"
        )
        log.warning("sent message %s not filed on the server yet: %s", message.message_id, why)
        raise TaskRetry(
            f"delivered; the copy is not filed in {message.folder_name} yet: {why}",
            otherwise={**delivered, "sentCopy": f"not filed on the server: {why}"},
        ) from None
    except TaskFailed as exc:  # a password that no longer decrypts, an account disabled since
        return f"not filed on the server: {exc.message}"
    except TaskDeferred:
        raise  # waits for the account's running sync, without counting a try
    except Exception:
        log.exception("sent message %s: filing its copy failed unexpectedly", message.message_id)
        return f"not filed on the server: an internal error stopped it (reference {context.task_id})"


def send_failed(context: TaskContext, message: str, permanent: bool) -> None:
    """However a send task failed, its message says so: ambiguous if its data may have gone out."""
    runtime, principal = context.runtime, context.principal
    if context.message_id is None:
        return
    if not delivery.set_status(
        runtime.db,
        principal,
        context.message_id,
        DeliveryStatus.AMBIGUOUS,
        message,
        unless=(*FINAL, DeliveryStatus.QUEUED, DeliveryStatus.DRAFT),
    ):
        delivery.set_status(runtime.db, principal, context.message_id, DeliveryStatus.FAILED, message, unless=FINAL)


def run_draft(context: TaskContext) -> dict[str, Any]:
    """Put a draft saved through the API into the server's Drafts folder with \\Draft."""
    message = _load(context)
    try:
        return {"draftCopy": _file_copy(context, message, ("\\Draft", "\\Seen"), raise_errors=True)}
    except MailServerError as exc:
        raise TaskRetry(str(exc)) from None


def _filed_before(
    session: ImapSession, context: TaskContext, message: delivery.Outgoing, folder_name: str
) -> tuple[int, int] | None:
    """(UIDVALIDITY, UID) of the copy an earlier try of this task filed, when it did.

    An APPEND whose answer never came (the connection dropped, the reply timed out) may have
    stored the copy all the same: a try after it looks for the message's Message-ID first,
    rather than file it twice. The first try has nothing to look for.
    """
    if context.attempt <= 1 or not message.message_id_header:
        return None
    try:
        return session.find_message_id(folder_name, message.message_id_header)
    except ConnectionFailed:
        raise
    except MailServerError as exc:
        # A server that cannot search by header: filing again is all that is left.
        log.info("message %s: no search for an earlier copy: %s", message.message_id, exc)
        return None


def _file_copy(
    context: TaskContext, message: delivery.Outgoing, flags: tuple[str, ...], *, raise_errors: bool = False
) -> str:
    """APPEND the message to its folder on the IMAP server; returns what happened, in words.

    A temporary failure of the server is raised (``MailServerError``) for the caller's task to
    try again; a permanent one fails a draft's task, and is the answer for a sent message's copy.
    """
    if message.uid is not None:
        return "already on the server"
    runtime, principal, account_id = context.runtime, context.principal, context.account_id
    assert account_id is not None
    try:
        servers = load_servers(runtime.db, runtime.cipher, principal, account_id)
    except CredentialError:
        raise TaskFailed("the stored password cannot be decrypted; set the account's password again") from None
    if servers is None:
        # Disabled (or deleted) since: the copy is not filed; a draft's task fails in words.
        if raise_errors:
            raise TaskFailed("the account is disabled; the draft is kept here, not on the server", permanent=True)
        return "not filed: the account is disabled"
    if servers.incoming.protocol is not Protocol.IMAP:
        return "kept here only (POP3 has no server folders)"
    # A sync must not fetch the copy before its row has the UID. A draft's runner holds the
    # account already; a send (whose delivery did not wait for the account) takes it here.
    lock = None if context.holds_account else AccountLock(runtime.db, account_id)
    if lock is not None and not lock.acquire():
        # The delivery is recorded; only the filing waits for the running sync.
        raise TaskDeferred(random.uniform(2.0, 6.0), "waiting for a running sync of this account to finish")
    folder_name = message.folder_name
    try:
        try:
            with servers.incoming.imap(runtime.settings) as session:
                if session.gmail:
                    return "filed by the server itself"  # Gmail keeps its own copy of what it sends
                if message.folder_on_server:
                    session.ensure_folder(folder_name)
                else:
                    # Never synced: the server may have this role's folder under another name.
                    folder_name = role_folder_on_server(session, message.folder_type, folder_name)
                    adopt_server_folder(runtime.db, principal, message.folder_id, message.message_id, folder_name)
                appended = _filed_before(session, context, message, folder_name)
                if appended is None:
                    appended = session.append(folder_name, message.data, flags, message.date)
        except MailServerError as exc:
            if not exc.permanent:
                raise  # the server may take it later: the caller's task tries again
            if raise_errors:
                raise TaskFailed(str(exc), permanent=True) from None
            log.warning("sent message %s not filed on the server: %s", message.message_id, exc)
            return f"not filed on the server: {exc}"
        if appended is not None:
            # The row takes the server's UID, so the next sync sees one copy, not two.
            moves.filed_on_server(
                runtime, principal, message.message_id, message.folder_id, appended, len(message.data)
            )
    finally:
        if lock is not None:
            lock.release()
    return f"filed in {folder_name}"
