"""``email-service watch``: one asyncio process holding IMAP IDLE for many accounts.

Every ``LEASE_SECONDS / 3`` the watcher looks at which accounts should be watched (enabled IMAP
accounts with sync on), renews the leases it holds, gives back what it holds beyond its fair
share, takes free leases up to it, and starts or stops one watching task per account. A task
logs in, examines INBOX and waits in IDLE while it catches up once; each change the server reports
(EXISTS, EXPUNGE, FETCH) brings INBOX up to date in a thread of this process, within about a
second of the change. Every folder gets a look at the account's sync interval (one STATUS per
unchanged folder, in this process: it is the account's automatic sync, and the scheduler then
has nothing to queue for it). Connections that fail are retried with a growing wait; a server
without IDLE is left to the scheduler's interval sync.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import os
import random
import resource
import signal
import socket
import ssl
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text

from email_service.config import Settings
from email_service.crypto import CredentialError
from email_service.mailbox.live import refresh_folder
from email_service.observability import metrics
from email_service.protocols.destinations import DestinationRefused
from email_service.protocols.errors import MailServerError
from email_service.protocols.tls import client_context
from email_service.runtime import Runtime
from email_service.services.servers import load_servers
from email_service.tenancy import Principal
from email_service.watch.idle import IDLE_RENEW_SECONDS, IdleConnection
from email_service.watch.leases import Leases

log = logging.getLogger(__name__)
RETRY_FIRST, RETRY_MAX = 2.0, 300.0
NO_IDLE_PAUSE = 3600.0  # a server without IDLE is asked again after an hour
TLS_READ_BUFFER = 16 * 1024


@dataclass(frozen=True)
class Watchable:
    account_id: str
    principal: Principal
    version: datetime  # the account's updated_at: a change of settings restarts its watch
    sync_interval: int  # seconds between looks at every folder (the inbox is watched all the time)


def watchable_accounts(runtime: Runtime) -> dict[str, Watchable]:
    """Enabled IMAP accounts with sync on, across all tenants."""
    with runtime.db.maintenance_session() as session:
        rows = session.execute(
            text(
                "SELECT id, tenant_id, user_id, updated_at, sync_interval FROM accounts"
                " WHERE deleted_at IS NULL AND is_enabled AND is_sync_enabled AND protocol = 'imap'"
            )
        ).all()
    return {
        row.id: Watchable(
            row.id,
            Principal(uuid.UUID(str(row.tenant_id)), uuid.UUID(str(row.user_id))),
            row.updated_at,
            row.sync_interval,
        )
        for row in rows
    }


class Watcher:
    def __init__(self, settings: Settings, *, name: str | None = None) -> None:
        self.settings = settings
        self.runtime = Runtime.build(settings)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.leases = Leases(self.runtime.redis, self.name, ttl=settings.watch_lease_seconds)
        # One TLS context for every connection: building one per account would cost memory per account.
        self.tls: ssl.SSLContext = client_context(settings.ca_file)
        self.executor = ThreadPoolExecutor(max_workers=settings.watch_threads, thread_name_prefix="refresh")
        # Catching up (a watch starting, a look at every folder) may take all but a quarter of the
        # threads: when a watcher takes over a dead one's accounts, hundreds of catch-ups queue at
        # once, and a change a server reports on an account already watched must not wait behind them.
        self.catching_up = asyncio.Semaphore(max(1, settings.watch_threads - max(1, settings.watch_threads // 4)))
        # Leases and the account list on a thread of their own: refreshes may each wait on a slow
        # server for the whole IMAP timeout, and a renewal queued behind them would let the
        # leases lapse, so other watchers would take the accounts over while they are watched.
        self.leasing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leases")
        self.stopping = asyncio.Event()
        self.watching: dict[str, tuple[Watchable, asyncio.Task]] = {}
        self.paused: dict[str, float] = {}  # account id -> loop time until which it is not watched

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        log.info("watcher %s started", self.name)
        try:
            while not self.stopping.is_set():
                await self.round()
                with_timeout = asyncio.ensure_future(self.stopping.wait())
                await asyncio.wait({with_timeout}, timeout=max(1.0, self.settings.watch_lease_seconds / 3))
                with_timeout.cancel()
        finally:
            await self.shutdown()

    async def round(self) -> None:
        """One round: ``balance``; a database or Redis hiccup keeps the watches, tried again next round."""
        try:
            await self.balance()
        except Exception:
            log.exception("watcher round failed")
            if self.watching and self.leases.lapsed():
                # Every lease has run out unrenewed (Redis away, or this watcher cut off from it):
                # other watchers may take the accounts now, and each must be watched once. The
                # leases are taken again, and the watches started again, when Redis answers.
                log.warning("leases not renewed for %d s: stopping %d watches", self.leases.ttl, len(self.watching))
                await self.stop_watching(dict.fromkeys(self.watching, False))

    async def balance(self) -> None:
        loop = asyncio.get_running_loop()
        # Redis first: a database that is away (a failover, a restart) must not let the leases
        # lapse while the watches go on, or other watchers would take the accounts meanwhile and
        # every watch would start over when it came back.
        watchers = await loop.run_in_executor(self.leasing, self.leases.live_watchers)
        kept = await loop.run_in_executor(self.leasing, self.leases.renew, list(self.watching))
        wanted = await loop.run_in_executor(self.leasing, watchable_accounts, self.runtime)
        share = Leases.fair_share(len(wanted), watchers)
        ending = {
            account_id: account_id in kept
            for account_id, (watched, task) in self.watching.items()
            if account_id not in kept
            or wanted.get(account_id) is None
            or wanted[account_id].version != watched.version
            # A watch that ended by itself (a server without IDLE, paused; an account gone) gives
            # its lease and its place in the share back, rather than hold both for nothing.
            or task.done()
        }
        excess = len(self.watching) - len(ending) - share
        if excess > 0:
            # More than a fair share (another watcher started): hand some over.
            log.info("handing %d accounts over (%d watchers, a share is %d)", excess, watchers, share)
            staying = [a for a in self.watching if a not in ending]
            ending.update({account_id: True for account_id in random.sample(staying, excess)})
        await self.stop_watching(ending)
        now = loop.time()
        candidates = [a for a in wanted if a not in self.watching and self.paused.get(a, 0) <= now]
        random.shuffle(candidates)
        room = share - len(self.watching)
        if room > 0 and candidates:
            taken = await loop.run_in_executor(self.leasing, self.leases.claim, candidates, room)
            for account_id in taken:
                self.start_watching(wanted[account_id])
            if taken:
                log.info("watching %d more accounts (%d in all)", len(taken), len(self.watching))

    def start_watching(self, account: Watchable) -> None:
        task = asyncio.create_task(self.watch(account), name=f"watch-{account.account_id}")
        self.watching[account.account_id] = (account, task)

    async def stop_watching(self, accounts: dict[str, bool]) -> None:
        """Stop watching these accounts (all at once); give back the leases marked True."""
        tasks = [self.watching.pop(account_id)[1] for account_id in accounts]
        for task in tasks:
            task.cancel()
        # How each watch ended no longer matters.
        await asyncio.gather(*tasks, return_exceptions=True)
        released = [account_id for account_id, release in accounts.items() if release]
        if released:
            await asyncio.get_running_loop().run_in_executor(self.leasing, self.leases.release, released)

    async def shutdown(self) -> None:
        held = list(self.watching)
        await self.stop_watching(dict.fromkeys(held, False))
        try:
            self.leases.leave(held)
        except Exception:  # noqa: BLE001 - the leases run out by themselves
            log.warning("could not hand the leases back; they run out within %d s", self.settings.watch_lease_seconds)
        self.executor.shutdown(wait=True)
        self.leasing.shutdown(wait=True)
        self.runtime.close()
        log.info("watcher %s stopped", self.name)

    # ------------------------------------------------------------------ one account

    async def watch(self, account: Watchable) -> None:
        loop = asyncio.get_running_loop()
        wait = RETRY_FIRST
        while not self.stopping.is_set():
            connection, catch_up = None, None
            try:
                servers = await loop.run_in_executor(
                    self.executor,
                    load_servers,
                    self.runtime.db,
                    self.runtime.cipher,
                    account.principal,
                    account.account_id,
                )
                if servers is None:
                    return
                connection = await IdleConnection.open(servers.incoming, self.settings, self.tls)
                metrics.IDLE_CONNECTIONS.inc()
                if not connection.supports_idle:
                    log.info("account %s: server has no IDLE; left to interval sync", account.account_id)
                    self.paused[account.account_id] = loop.time() + NO_IDLE_PAUSE
                    return
                # Whatever changed while nobody watched, caught up beside the IDLE (behind other
                # accounts' catch-ups maybe), then every change as it happens. Every folder gets a
                # look at the account's interval (this is its automatic sync, so the scheduler need
                # not fork a job for it), spread out so looks do not come together.
                catch_up = _CatchUp(self, account)
                next_look = loop.time() + account.sync_interval * random.uniform(0.5, 1.0)
                while not self.stopping.is_set():
                    renew = max(1.0, min(IDLE_RENEW_SECONDS, next_look - loop.time()))
                    changed = await connection.wait_for_change(self.stopping, catch_up.failed, renew=renew)
                    catch_up.raise_failure()
                    if changed:
                        await catch_up.settle()  # the change's refresh covers it, unless it has begun
                        await self.refresh(account)
                        wait = RETRY_FIRST
                    if loop.time() >= next_look:
                        await self.catch_up(account, folder=None)
                        next_look = loop.time() + account.sync_interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure ends this connection; _interrupted sorts them
                if catch_up is not None and catch_up.succeeded:
                    wait = RETRY_FIRST  # it was watching well: a new interruption starts the waits over
                if not _interrupted(account, exc, wait):
                    return
            finally:
                if catch_up is not None:
                    catch_up.drop()
                if connection is not None:
                    metrics.IDLE_CONNECTIONS.dec()
                    await connection.close()
            if self.stopping.is_set():
                return
            await asyncio.sleep(wait * random.uniform(0.8, 1.2))
            wait = min(wait * 2, RETRY_MAX)

    async def catch_up(
        self, account: Watchable, folder: str | None = "INBOX", *, begun: asyncio.Event | None = None
    ) -> None:
        """``refresh``, in the share of the threads that leaves room for reported changes."""
        async with self.catching_up:
            if begun is not None:
                begun.set()
            await self.refresh(account, folder)

    async def refresh(self, account: Watchable, folder: str | None = "INBOX") -> None:
        """Bring ``folder`` (every folder with None) up to date now: a change the server reported."""
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self.executor, refresh_folder, self.runtime, account.principal, account.account_id, folder
        )
        if result is not None and (result.messages_added or result.messages_updated or result.messages_removed):
            log.debug("account %s: %s", account.account_id, result.as_dict())


class _CatchUp:
    """A watch's first catch-up, beside its IDLE: a reported change overtakes it if it has not begun."""

    def __init__(self, watcher: Watcher, account: Watchable) -> None:
        self.begun = asyncio.Event()
        self.failed = asyncio.Event()  # ends the IDLE: the watch starts over, as when a refresh fails
        self.error: BaseException | None = None
        self.task = asyncio.create_task(watcher.catch_up(account, begun=self.begun))
        self.task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            self.error = error
            self.failed.set()

    @property
    def succeeded(self) -> bool:
        return self.task.done() and not self.task.cancelled() and self.error is None

    def raise_failure(self) -> None:
        if self.error is not None:
            raise self.error

    async def settle(self) -> None:
        """Drop it while it waits its turn; once begun, let it finish (its thread cannot be stopped)."""
        if not self.begun.is_set():
            self.task.cancel()
            return
        await asyncio.wait({self.task})
        self.raise_failure()

    def drop(self) -> None:
        # Not waited for: a watch that ends (a stop, a hand-over) must not wait on a slow server.
        self.task.cancel()


def _interrupted(account: Watchable, exc: Exception, wait: float) -> bool:
    """Log why a watch ended; False when it is not to be tried again until the account changes."""
    if not isinstance(exc, MailServerError | CredentialError | OSError | TimeoutError):
        log.error("account %s: watch failed; again in %.0f s", account.account_id, wait, exc_info=exc)
        return True
    metrics.connection_failed("imap", exc)
    if isinstance(exc, CredentialError | DestinationRefused) or getattr(exc, "permanent", False):
        # A refused login, an unknown host, a certificate or a destination the policy refuses
        # stays so until someone changes the account, which restarts its watch; meanwhile the
        # account's own sync (and its backoff) reports it.
        log.info("account %s: not watched until its settings change (%s)", account.account_id, exc)
        return False
    log.info("account %s: watch interrupted (%s); again in %.0f s", account.account_id, exc, wait)
    return True


def _raise_open_files_limit() -> None:
    # One socket per watched account: the default soft limit (often 1,024) would cap a watcher
    # far below the thousands of accounts one asyncio process can hold.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _small_tls_buffers() -> None:
    # asyncio gives every TLS connection a 256 KiB read buffer (SSLProtocol.max_size), filled with
    # zeros at once: a quarter of a megabyte per watched account. An idling IMAP connection reads a
    # line now and then; 16 KiB (one TLS record) loses nothing and keeps thousands of them affordable.
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def run_watcher(settings: Settings) -> None:
    """Watch until SIGTERM or SIGINT; leases are handed back on the way out."""
    _raise_open_files_limit()
    _small_tls_buffers()
    asyncio.run(Watcher(settings).run())
