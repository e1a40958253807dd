"""``email-service webhooks``: fan-out from the change log, and sending due deliveries with asyncio.

One process sends to thousands of endpoints: a request waiting on a receiver is a coroutine, not
a thread or a worker. Fairness comes from the claim: a delivery is taken only while its endpoint
and its tenant have fewer requests open (across all dispatchers) than their limits, so a hanging
receiver ties up at most its endpoint's share, and other tenants' deliveries are claimed and sent
meanwhile.

Several dispatchers may run at once. A delivery is claimed with ``FOR UPDATE SKIP LOCKED`` and
a lease (``claimed_until``) in PostgreSQL, so no two send it at the same time; one whose
dispatcher died is claimed again when its lease ends. The outcome is recorded only by the holder
of the claim. Redis is not involved: losing it loses nothing here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
from sqlalchemy import select, text, update
from sqlalchemy.exc import SQLAlchemyError

from email_service.changes.log import CHANNEL, LISTEN_CONNECTION
from email_service.config import Settings
from email_service.crypto import CredentialCipher, CredentialError
from email_service.db import Database, sqlalchemy_url
from email_service.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from email_service.observability import metrics
from email_service.protocols.destinations import DestinationRefused
from email_service.protocols.tls import client_context
from email_service.queue.policy import WEBHOOK_ENDPOINT_BACKOFF, webhook_retry_delay
from email_service.webhooks import service, signing, urls
from email_service.webhooks.fanout import accounts_behind, fan_out, prune

log = logging.getLogger(__name__)
CLAIM_BATCH = 100
POLL_SECONDS = 1.0  # the longest a delivery made by another process waits to be noticed
USER_AGENT = "email-service-webhooks/1"
# Name look-ups block a thread each (getaddrinfo cannot be cancelled), and a receiver's name server
# may take the resolver's whole timeout. They get threads of their own (the database work every
# delivery needs keeps asyncio's), at most a few per tenant, so one tenant's slow DNS holds up
# neither that work nor other tenants' look-ups.
DNS_THREADS = 32
DNS_PER_TENANT = 4

# Requests open now are the claimed deliveries (a claim is cleared when its outcome is recorded),
# so the limits hold across every dispatcher process, not per process. Claims take turns under an
# advisory lock: two dispatchers counting at once could otherwise both fill the same room.
CLAIM_LOCK_ID = 0x77686B  # "whk"
_CLAIM = text("""
WITH open_requests AS (
    SELECT endpoint_id, tenant_id FROM webhook_deliveries
    WHERE claimed_until IS NOT NULL AND claimed_until > now()
), busy_endpoints AS (
    SELECT endpoint_id, count(*) AS n FROM open_requests GROUP BY endpoint_id
), busy_tenants AS (
    SELECT tenant_id, count(*) AS n FROM open_requests GROUP BY tenant_id
), candidates AS (
    -- No endpoint takes more than its cap at once, so each is asked for that many of its due
    -- deliveries, in order (webhook_deliveries_waiting_in_order): a backlog of millions costs what
    -- its first rows do, and while the endpoint fails the same ones are retried, not each in turn.
    SELECT d.id, d.endpoint_id, d.tenant_id, d.next_attempt_at,
           row_number() OVER (PARTITION BY d.endpoint_id ORDER BY d.next_attempt_at, d.id) AS n_endpoint
    FROM webhook_endpoints e CROSS JOIN LATERAL (
        SELECT w.id, w.endpoint_id, w.tenant_id, w.next_attempt_at FROM webhook_deliveries w
        WHERE w.endpoint_id = e.id AND w.status = 'pending' AND w.next_attempt_at <= now()
          AND (w.claimed_until IS NULL OR w.claimed_until < now())
        ORDER BY w.next_attempt_at, w.id LIMIT :endpoint_cap
    ) d
    WHERE e.status = 'enabled'
), endpoint_room AS (
    SELECT c.*, row_number() OVER (PARTITION BY c.tenant_id ORDER BY c.next_attempt_at, c.id) AS n_tenant
    FROM candidates c LEFT JOIN busy_endpoints b ON b.endpoint_id = c.endpoint_id
    WHERE c.n_endpoint <= :endpoint_cap - coalesce(b.n, 0)
), allowed AS (
    SELECT r.id FROM endpoint_room r LEFT JOIN busy_tenants b ON b.tenant_id = r.tenant_id
    WHERE r.n_tenant <= :tenant_cap - coalesce(b.n, 0)
    ORDER BY r.next_attempt_at LIMIT :limit
), locked AS (
    SELECT d.id FROM webhook_deliveries d
    WHERE d.id IN (SELECT id FROM allowed) AND d.status = 'pending'
      AND (d.claimed_until IS NULL OR d.claimed_until < now())
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE webhook_deliveries d
SET claimed_by = :me, claimed_until = now() + make_interval(secs => :lease)
FROM webhook_endpoints e
WHERE d.id IN (SELECT id FROM locked) AND e.id = d.endpoint_id
RETURNING d.id, d.endpoint_id, d.tenant_id, d.event_type, d.payload, e.url, e.secret_encrypted,
    -- A rotated-out secret signs too until it expires; read at the claim, just before sending.
    CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret_encrypted END AS previous_secret_encrypted
""")
_RELEASE = text(
    "UPDATE webhook_deliveries SET claimed_by = NULL, claimed_until = NULL"
    " WHERE claimed_by = :me AND status = 'pending'"
)
# A success to an endpoint makes its deliveries held back for other deliveries' failures due again:
# one never tried (since the endpoint was last enabled) at once, one that failed itself at the
# retry its own failure scheduled (or at once, when that has passed). One being sent is left alone,
# and so is one already at its own time (no row is rewritten for nothing). A single UPDATE without
# a join, so the held rows are read through webhook_deliveries_waiting_in_order and nothing else.
_OWN_RETRY = (
    "CASE WHEN d.attempts > 0 THEN (SELECT a.next_attempt_at FROM webhook_attempts a"
    " WHERE a.delivery_id = d.id ORDER BY a.id DESC LIMIT 1) END"
)
_HELD_BACK_DUE = text(f"""
UPDATE webhook_deliveries d SET next_attempt_at = greatest(:now, {_OWN_RETRY})
WHERE d.endpoint_id = :endpoint AND d.status = 'pending' AND d.next_attempt_at > :now
  AND (d.claimed_until IS NULL OR d.claimed_until < :now)
  AND d.next_attempt_at > greatest(:now, {_OWN_RETRY})
""")
_NEXT_DUE = text("""
SELECT extract(epoch FROM min(d.next_attempt_at) - now())
FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id
WHERE d.status = 'pending' AND e.status = 'enabled' AND d.next_attempt_at > now()
""")


@dataclass(frozen=True)
class Claimed:
    id: str
    endpoint_id: str
    tenant_id: str
    event_type: str
    payload: dict[str, Any]
    url: str
    secret_encrypted: bytes
    previous_secret_encrypted: bytes | None = None  # only while it has not expired


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class Dispatcher:
    def __init__(self, settings: Settings, db: Database, cipher: CredentialCipher, *, name: str | None = None) -> None:
        self.settings, self.db, self.cipher = settings, db, cipher
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._sending: set[asyncio.Task] = set()
        self._accounts: set[str] = set()
        self._deliveries_due = asyncio.Event()
        self._changes_noted = asyncio.Event()
        self._catch_up = asyncio.Event()
        timeout = settings.webhook_timeout_seconds
        # A receiver that trickles its answer a byte at a time would beat any per-read timeout.
        self._total_timeout = timeout * 3
        self._lease = self._total_timeout + 30
        self._resolving = ThreadPoolExecutor(max_workers=DNS_THREADS, thread_name_prefix="webhook-dns")
        self._lookups: dict[str, tuple[asyncio.Semaphore, int]] = {}  # tenant -> its slots, look-ups using them

    # ------------------------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        timeout = self.settings.webhook_timeout_seconds
        context: ssl.SSLContext = client_context(self.settings.ca_file)
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=timeout),
            follow_redirects=False,  # a redirect could lead anywhere the policy never checked
            trust_env=False,  # no proxy from the environment: requests go to the checked address
            verify=context,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=200),
        ) as client:
            self._client = client
            loops = [
                asyncio.create_task(self._listen(), name="listen"),
                asyncio.create_task(self._fan_out_loop(), name="fan-out"),
                asyncio.create_task(self._claim_loop(), name="claim"),
            ]
            log.info("webhook dispatcher %s started", self.name)
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopping, *loops], return_when=asyncio.FIRST_COMPLETED)
            crashed = [task for task in loops if task in done]
            for task in [stopping, *loops]:
                task.cancel()
            await asyncio.gather(stopping, *loops, return_exceptions=True)
            if self._sending:
                # Requests under way may finish and be recorded; the rest are claimed again later.
                await asyncio.wait(self._sending, timeout=min(5.0, timeout))
            for task in self._sending:
                task.cancel()
            await asyncio.gather(*self._sending, return_exceptions=True)
            try:
                # Unfinished requests are free for another dispatcher now, not when their lease ends.
                await asyncio.to_thread(self._release_claims)
            except SQLAlchemyError as exc:
                log.warning("releasing claims failed (%s); they run out by themselves", type(exc).__name__)
        self._resolving.shutdown(wait=False, cancel_futures=True)
        log.info("webhook dispatcher %s stopped", self.name)
        if crashed:
            # A loop that died would leave a process that looks alive and sends nothing: exit, and
            # let whoever runs it (serve's supervisor, systemd, Kubernetes) start another.
            error = crashed[0].exception()
            raise RuntimeError(f"webhook dispatcher loop {crashed[0].get_name()} stopped: {error!r}") from error

    async def _listen(self) -> None:
        """Hear committed changes at once; a dropped connection means a catch-up pass when it returns."""
        dsn = sqlalchemy_url(self.settings.database_url or "").replace("postgresql+psycopg://", "postgresql://", 1)
        delay = 1.0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, **LISTEN_CONNECTION) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    log.info("listening for changes on %s", CHANNEL)
                    self._catch_up.set()
                    self._changes_noted.set()
                    delay = 1.0
                    async for note in conn.notifies():
                        try:
                            self._accounts.add(str(json.loads(note.payload)["a"]))
                        except (ValueError, KeyError, TypeError):
                            continue
                        self._changes_noted.set()
            except (psycopg.Error, OSError) as exc:
                log.warning("listening for changes failed (%s); again in %.0f s", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _fan_out_loop(self) -> None:
        """Passes over the accounts with new entries, each account one batch per pass.

        A first sync writes one entry per message, so one account may owe hundreds of batches.
        Taking turns keeps that backlog from holding up everyone else: an account heard of
        meanwhile is fanned out after at most one more batch of each backlog, and the accounts
        with entries left go round again, without waiting for a notification, until they are done.
        """
        loop = asyncio.get_running_loop()
        next_catch_up = 0.0
        unfinished: list[str] = []  # accounts whose last batch left entries, in turn order
        while True:
            if not unfinished:
                wait = max(0.0, next_catch_up - loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changes_noted.wait(), timeout=wait)
            self._changes_noted.clear()
            heard, self._accounts = self._accounts, set()
            # Newly heard accounts first: a fresh change then waits for no backlog's batch of this pass.
            turn = list(dict.fromkeys([*heard, *unfinished]))
            unfinished = []
            try:
                if self._catch_up.is_set() or loop.time() >= next_catch_up:
                    self._catch_up.clear()
                    # Nothing waits on a lost notification longer than one catch-up interval.
                    behind = await asyncio.to_thread(accounts_behind, self.db)
                    turn = list(dict.fromkeys([*turn, *behind]))
                    await asyncio.to_thread(prune, self.db)
                    await self._forget_expired_secrets()
                    next_catch_up = loop.time() + self.settings.webhook_catchup_seconds
                for account_id in turn:
                    created, more = await asyncio.to_thread(fan_out, self.db, account_id)
                    if created:
                        self._deliveries_due.set()
                    if more:
                        unfinished.append(account_id)
            except SQLAlchemyError as exc:
                log.warning("webhook fan-out failed: %s", type(exc).__name__)
                # The whole turn again: a pass over an account with nothing new costs a read.
                self._accounts.update(turn)
                unfinished = []
                await asyncio.sleep(1.0)

    async def _forget_expired_secrets(self) -> None:
        # Housekeeping: failing (a lock wait, a timeout) must not hold up the fan-out beside it.
        try:
            await asyncio.to_thread(service.forget_expired_secrets, self.db)
        except SQLAlchemyError as exc:
            log.warning("dropping expired webhook secrets failed: %s", type(exc).__name__)

    async def _claim_loop(self) -> None:
        while True:
            try:
                claimed = await asyncio.to_thread(self._claim)
            except SQLAlchemyError as exc:
                log.warning("claiming webhook deliveries failed: %s", type(exc).__name__)
                claimed = []
            for delivery in claimed:
                task = asyncio.create_task(self._deliver(delivery))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
            if len(claimed) == CLAIM_BATCH:
                continue
            wait = POLL_SECONDS
            try:
                due_in = await asyncio.to_thread(self._next_due)
            except SQLAlchemyError:
                due_in = None
            if due_in is not None:
                wait = min(wait, max(0.01, due_in))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._deliveries_due.wait(), timeout=wait)
            self._deliveries_due.clear()

    # ------------------------------------------------------------------------- one delivery

    async def _deliver(self, delivery: Claimed) -> None:
        try:
            try:
                outcome = await asyncio.wait_for(self._send(delivery), timeout=self._total_timeout)
            except TimeoutError:
                words = f"no complete answer within {self._total_timeout:.0f} s"
                outcome = Outcome(None, words, int(self._total_timeout * 1000))
            except Exception:
                # Whatever broke, the attempt is recorded as failed, so the delivery backs off
                # (and its endpoint is disabled in time) instead of being claimed again at once.
                log.exception("webhook delivery %s failed unexpectedly", delivery.id)
                outcome = Outcome(None, "the request could not be made (an internal error)", 0)
            await asyncio.to_thread(self._record, delivery, outcome)
        except SQLAlchemyError as exc:
            # The claim runs out and the delivery is sent again: receivers dedupe on webhook-id.
            log.warning("recording webhook delivery %s failed: %s", delivery.id, type(exc).__name__)
        finally:
            self._deliveries_due.set()  # room for another of this endpoint or tenant

    def _previous_secret(self, delivery: Claimed) -> str | None:
        """The rotated-out secret still in its grace period, if any and if it still decrypts.

        One that does not (its key was retired from the keyring) only loses its signature: the
        delivery still goes out signed with the current secret, which receivers were given.
        """
        if delivery.previous_secret_encrypted is None:
            return None
        try:
            return self.cipher.decrypt(delivery.previous_secret_encrypted)
        except CredentialError:
            log.warning(
                "endpoint %s: its previous secret does not decrypt; signed with the current one alone",
                delivery.endpoint_id,
            )
            return None

    async def _send(self, delivery: Claimed) -> Outcome:
        started = time.monotonic()

        def done(status: int | None, error: str | None) -> Outcome:
            return Outcome(status, error, int((time.monotonic() - started) * 1000))

        try:
            target = urls.parse(delivery.url)
            # Resolved and checked now, at every delivery: DNS may answer differently than at create.
            addresses = await self._look_up(delivery.tenant_id, target)
            secret = self.cipher.decrypt(delivery.secret_encrypted)
            previous = self._previous_secret(delivery)
        except DestinationRefused as exc:
            return done(None, str(exc))
        except (socket.gaierror, UnicodeError):
            return done(None, f"the host name {urls.parse(delivery.url).host} does not resolve")
        except urls.WebhookUrlError as exc:
            return done(None, str(exc))
        except CredentialError:
            return done(None, "the endpoint's secret does not decrypt with any configured key")
        body = json.dumps(delivery.payload, separators=(",", ":"), ensure_ascii=False)
        headers = {
            **signing.headers(secret, delivery.id, datetime.now(UTC), body, previous),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "host": target.host_header,
        }
        # Connect to the address that was checked; TLS still verifies (and SNI names) the host.
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        error = "no address to connect to"
        for _family, sockaddr in addresses:
            request = self._client.build_request(
                "POST",
                httpx.URL(target.url).copy_with(host=str(sockaddr[0]).partition("%")[0]),
                content=body.encode(),
                headers=headers,
                extensions=extensions,
            )
            try:
                response = await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Nothing was sent, so the next permitted address may answer: a host that is down
                # or drops packets times out rather than refusing. _deliver's limit bounds them all.
                error = _words(exc, self.settings.webhook_timeout_seconds)
                continue
            except httpx.HTTPError as exc:
                return done(None, _words(exc, self.settings.webhook_timeout_seconds))
            # The answer's body is never read: only its status counts, and a body could be endless.
            await response.aclose()
            if 200 <= response.status_code < 300:
                return done(response.status_code, None)
            return done(response.status_code, _status_words(response.status_code))
        return done(None, error)

    async def _look_up(self, tenant_id: str, target: urls.Target) -> list[tuple[int, tuple]]:
        loop = asyncio.get_running_loop()
        slots, users = self._lookups.get(tenant_id) or (asyncio.Semaphore(DNS_PER_TENANT), 0)
        self._lookups[tenant_id] = (slots, users + 1)
        try:
            await slots.acquire()
        except BaseException:
            self._leave_lookup(tenant_id)
            raise
        thread = self._resolving.submit(urls.permitted_addresses, target, self.settings.destinations)

        def finished(_thread: object) -> None:
            # The slot is the thread's, not the waiting delivery's: a look-up that outlives its
            # delivery (cancelled at the request's time limit) holds it until the resolver returns,
            # so a tenant whose name server drops queries never has more than its share of threads.
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to free
                loop.call_soon_threadsafe(self._end_lookup, tenant_id, slots)

        thread.add_done_callback(finished)
        return await asyncio.wrap_future(thread)

    def _end_lookup(self, tenant_id: str, slots: asyncio.Semaphore) -> None:
        slots.release()
        self._leave_lookup(tenant_id)

    def _leave_lookup(self, tenant_id: str) -> None:
        # A tenant's slots are kept only while a look-up of it waits or runs.
        slots, users = self._lookups[tenant_id]
        if users == 1:
            del self._lookups[tenant_id]
        else:
            self._lookups[tenant_id] = (slots, users - 1)

    # -------------------------------------------------------------------------- database

    def _claim(self) -> list[Claimed]:
        with self.db.maintenance_session() as session:
            session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": CLAIM_LOCK_ID})
            rows = session.execute(
                _CLAIM,
                {
                    "me": self.name,
                    "lease": float(self._lease),
                    "limit": CLAIM_BATCH,
                    "endpoint_cap": self.settings.webhook_endpoint_concurrency,
                    "tenant_cap": self.settings.webhook_tenant_concurrency,
                },
            ).all()
        return [
            Claimed(
                id=row.id,
                endpoint_id=row.endpoint_id,
                tenant_id=str(row.tenant_id),
                event_type=row.event_type,
                payload=row.payload,
                url=row.url,
                secret_encrypted=bytes(row.secret_encrypted),
                previous_secret_encrypted=(
                    None if row.previous_secret_encrypted is None else bytes(row.previous_secret_encrypted)
                ),
            )
            for row in rows
        ]

    def _release_claims(self) -> None:
        with self.db.maintenance_session() as session:
            session.execute(_RELEASE, {"me": self.name})

    def _next_due(self) -> float | None:
        with self.db.maintenance_session() as session:
            value = session.scalar(_NEXT_DUE)
        return None if value is None else float(value)

    def _record(self, claimed: Claimed, outcome: Outcome) -> None:
        """The attempt, the delivery's next step, and the endpoint disabled when that was the last."""
        with self.db.maintenance_session() as session:
            delivery = session.scalar(
                select(WebhookDelivery)
                .where(WebhookDelivery.id == claimed.id, WebhookDelivery.claimed_by == self.name)
                .with_for_update()
            )
            if delivery is None:
                return  # deleted with its endpoint meanwhile, or the claim ran out and moved on
            now = datetime.now(UTC)
            attempt = delivery.attempts + 1
            delivery.attempts, delivery.claimed_by, delivery.claimed_until = attempt, None, None
            delivery.next_attempt_at = None
            reason = None
            if outcome.succeeded:
                delivery.status = "succeeded"
                metrics.lag_since(metrics.WEBHOOK_LAG, delivery.created_at)
                if WEBHOOK_ENDPOINT_BACKOFF:
                    # The receiver answers again: its backlog is not held to the failures' retry times.
                    session.execute(_HELD_BACK_DUE, {"endpoint": delivery.endpoint_id, "now": now})
            elif outcome.status_code == 410:
                delivery.status = "failed"
                reason = "the endpoint answered 410 Gone"
            else:
                delay = webhook_retry_delay(attempt, self.settings)
                if delay is None:
                    delivery.status = "failed"
                    reason = f"delivery {delivery.id} failed {attempt} times; the last: {outcome.error}"
                else:
                    delivery.next_attempt_at = now + timedelta(seconds=delay)
                    if WEBHOOK_ENDPOINT_BACKOFF:
                        # The endpoint's other waiting deliveries wait with this one: a receiver
                        # that is down gets a few requests per retry step, not one per delivery.
                        session.execute(
                            update(WebhookDelivery)
                            .where(
                                WebhookDelivery.endpoint_id == delivery.endpoint_id,
                                WebhookDelivery.status == "pending",
                                WebhookDelivery.id != delivery.id,
                                WebhookDelivery.next_attempt_at < delivery.next_attempt_at,
                                (WebhookDelivery.claimed_until.is_(None)) | (WebhookDelivery.claimed_until < now),
                            )
                            .values(next_attempt_at=delivery.next_attempt_at)
                        )
            session.add(
                WebhookAttempt(
                    delivery_id=delivery.id,
                    endpoint_id=delivery.endpoint_id,
                    tenant_id=delivery.tenant_id,
                    user_id=delivery.user_id,
                    attempt=attempt,
                    event_type=delivery.event_type,
                    attempted_at=now,
                    status_code=outcome.status_code,
                    error=outcome.error,
                    duration_ms=outcome.duration_ms,
                    next_attempt_at=delivery.next_attempt_at,
                )
            )
            if reason is not None:
                endpoint = session.get(WebhookEndpoint, delivery.endpoint_id, with_for_update=True)
                if endpoint is not None and endpoint.status == "enabled":
                    endpoint.status, endpoint.disabled_reason, endpoint.disabled_at = "disabled", reason, now
                    endpoint.updated_at = now
                    log.info("webhook endpoint %s disabled: %s", endpoint.id, reason)


def _status_words(status: int) -> str:
    if 300 <= status < 400:
        return f"the endpoint answered HTTP {status} (a redirect; redirects are not followed)"
    return f"the endpoint answered HTTP {status}"


def _words(exc: httpx.HTTPError, timeout: float) -> str:
    """What went wrong, in words a user can act on; never the receiver's own text."""
    if isinstance(exc, httpx.ConnectTimeout):
        return f"could not connect within {timeout:.0f} s"
    if isinstance(exc, httpx.ReadTimeout):
        return f"no answer within {timeout:.0f} s"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out after {timeout:.0f} s"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return "TLS handshake failed"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectError):
        return "connection refused" if "refused" in str(exc).lower() else "could not connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the endpoint closed the connection or did not answer with HTTP"
    return f"request failed ({type(exc).__name__})"


def run_dispatcher(settings: Settings, *, names: Iterable[str] = ()) -> None:
    """Run until SIGTERM or SIGINT; requests under way get a few seconds to finish."""
    if settings.database_url is None:
        raise ValueError("run_dispatcher needs a resolved DATABASE_URL")
    # httpx logs every request at INFO: one line per delivery would bury everything else.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    db = Database(settings.database_url, settings.db_app_role)
    dispatcher = Dispatcher(settings, db, CredentialCipher(settings.credential_keys))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await dispatcher.run(stop)

    try:
        asyncio.run(main())
    finally:
        db.dispose()
