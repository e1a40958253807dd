"""Live change streams: the change log, pushed to each caller as it commits.

One ``EventHub`` per API process holds a single PostgreSQL ``LISTEN`` connection and fans the
log's notifications out to the open streams. A notification only says "account A of tenant T,
user U, reached sequence S"; each stream then reads its own rows from the log through row-level
security, so a stream can never show another user's change, and whatever writes the log (sync,
PATCH, compose, watchers) appears in the streams without the stream knowing the writer.

Everything here runs on the server's event loop: a stream waiting for changes is a suspended
coroutine, not a thread, and the rows are read over a small async connection pool.

A stream's position is one sequence number per account (sequences are per account). Each event
carries the whole position as an opaque token in its SSE ``id``, so a client that reconnects with
``Last-Event-ID`` gets exactly the entries it had not seen, in order, none twice.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from email_service.changes.log import CHANNEL, LISTEN_CONNECTION
from email_service.errors import BadRequestError, DependencyUnavailableError, NotFoundError, TooManyRequestsError
from email_service.observability import metrics
from email_service.tenancy import Principal

log = logging.getLogger(__name__)

POSITION_PREFIX = "p1."
MAX_POSITION_CHARS = 16_384
_ACCOUNT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Rows read per query; a long catch-up is read (and sent) in pieces of this size.
READ_BATCH = 500
LISTEN_RETRY_MAX_SECONDS = 30.0


# --- positions -------------------------------------------------------------------------------


def encode_position(position: Mapping[str, int]) -> str:
    """The SSE id for a position: opaque to clients, compact, safe in a header and an ``id:`` line."""
    raw = ";".join(f"{account}:{seq}" for account, seq in sorted(position.items()))
    return POSITION_PREFIX + base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_position(token: str) -> dict[str, int]:
    """The position in a ``Last-Event-ID``; ``BadRequestError`` if this service did not issue it."""
    invalid = BadRequestError("Last-Event-ID is not an event id issued by this stream")
    if len(token) > MAX_POSITION_CHARS or not token.startswith(POSITION_PREFIX):
        raise invalid
    body = token[len(POSITION_PREFIX) :]
    try:
        # validate=True: a lenient decode would drop stray characters and accept garbage.
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True).decode("ascii")
    except (binascii.Error, ValueError):
        raise invalid from None
    position: dict[str, int] = {}
    for part in filter(None, raw.split(";")):
        account, _, seq = part.partition(":")
        if not _ACCOUNT_ID.match(account) or not seq.isdigit() or len(seq) > 18:
            raise invalid
        position[account] = int(seq)
    return position


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamEvent:
    """One server-sent event, independent of the HTTP framework that sends it."""

    event: str
    data: dict[str, Any]
    id: str


def _change_event(row: tuple, position: Mapping[str, int]) -> StreamEvent:
    account_id, seq, entity, entity_id, kind, folder_id, detail, created_at = row
    at: datetime = created_at
    return StreamEvent(
        event=f"{entity}.{kind}",
        data={
            "accountId": account_id,
            "entity": entity,
            "id": entity_id,
            "folderId": folder_id,
            "detail": detail or {},
            "seq": seq,
            "at": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        },
        id=encode_position(position),
    )


# --- the hub ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Subscription:
    """What one stream is waiting for: accounts moved past a sequence since it last looked."""

    principal: Principal
    account_id: str | None
    pending: dict[str, int] = field(default_factory=dict)
    # Set when notifications may have been missed (the LISTEN connection was lost): look at all.
    look_at_everything: bool = False
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self, account_id: str, seq: int) -> None:
        if self.account_id is not None and account_id != self.account_id:
            return
        if seq > self.pending.get(account_id, -1):
            self.pending[account_id] = seq
        self.wakeup.set()

    def notify_everything(self) -> None:
        self.look_at_everything = True
        self.wakeup.set()

    def take(self) -> tuple[dict[str, int], bool]:
        pending, everything = self.pending, self.look_at_everything
        self.pending, self.look_at_everything = {}, False
        self.wakeup.clear()
        return pending, everything


class EventHub:
    """The process's one LISTEN connection, its subscribers, and the pool the streams read with."""

    def __init__(self, conninfo: str, app_role: str, *, pool_size: int = 4) -> None:
        self.conninfo = conninfo
        self.pool_size = pool_size
        # Validated as an identifier by the settings; quoted anyway because it is spliced into SQL.
        self._set_role = f'SET LOCAL ROLE "{app_role}"'
        self._subscribers: dict[tuple[str, str], set[Subscription]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: AsyncConnectionPool | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._start_lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    @property
    def stream_count(self) -> int:
        return sum(len(subs) for subs in self._subscribers.values())

    async def start(self) -> None:
        """Open the pool and the LISTEN connection on the running loop, once.

        A server runs one loop for its life. An in-process test client may run each request on a
        loop of its own; the hub then starts afresh on the new loop, since connections belong to
        the loop that opened them.
        """
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._start_lock is None or self._lock_loop is not loop:
            self._start_lock, self._lock_loop = asyncio.Lock(), loop
        async with self._start_lock:
            if self._loop is loop:
                return
            self._subscribers.clear()
            self._listening = asyncio.Event()
            pool = AsyncConnectionPool(
                self.conninfo,
                min_size=1,
                max_size=self.pool_size,
                open=False,
                name="events",
                kwargs={"application_name": "email_service_events"},
            )
            try:
                await pool.open(wait=True, timeout=10)
            except PoolTimeout:
                await pool.close()
                raise DependencyUnavailableError("database unreachable") from None
            self._pool = pool
            self._listener = loop.create_task(self._listen(), name="events-listener")
            self._loop = loop
        # Until LISTEN is in place a commit would go unnoticed; wait for it (briefly) so a stream
        # that just opened sees the next commit.
        try:
            await asyncio.wait_for(self._listening.wait(), timeout=10)
        except TimeoutError:
            log.warning("events: LISTEN not established yet; streams will catch up when it is")

    async def close(self) -> None:
        if self._loop is not asyncio.get_running_loop():
            return
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        if self._pool is not None:
            await self._pool.close()
        self._loop = self._pool = self._listener = None

    async def _listen(self) -> None:
        delay = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, application_name="email_service_listen", **LISTEN_CONNECTION
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    delay = 0.5
                    # Anything committed while no LISTEN was in place is in the log: every stream
                    # looks again (on first start there are none, so this costs nothing).
                    for subs in self._subscribers.values():
                        for sub in subs:
                            sub.notify_everything()
                    async for note in conn.notifies():
                        self._dispatch(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a lost database connection must not end the hub
                self._listening.clear()
                log.warning("events: LISTEN connection lost (%s); reconnecting in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, LISTEN_RETRY_MAX_SECONDS)

    def _dispatch(self, payload: str) -> None:
        try:
            note = json.loads(payload)
            key, account_id, seq = (note["t"], note["u"]), str(note["a"]), int(note["s"])
        except (ValueError, KeyError, TypeError):
            log.warning("events: ignored a malformed notification")
            return
        for sub in self._subscribers.get(key, ()):
            sub.notify(account_id, seq)

    def subscribe(self, principal: Principal, account_id: str | None, *, max_per_user: int) -> Subscription:
        key = (str(principal.tenant_id), str(principal.user_id))
        subs = self._subscribers.setdefault(key, set())
        if len(subs) >= max_per_user:
            raise TooManyRequestsError(
                f"Too many open event streams - at most {max_per_user} per user; close one first",
                code="TOO_MANY_STREAMS",
            )
        sub = Subscription(principal, account_id)
        subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        key = (str(sub.principal.tenant_id), str(sub.principal.user_id))
        subs = self._subscribers.get(key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[key]

    async def _query(self, principal: Principal, sql: str, params: tuple) -> list[tuple]:
        """One short read as ``principal``, under the same RLS settings as every API transaction."""
        assert self._pool is not None, "EventHub.start() first"
        try:
            return await self._query_once(principal, sql, params)
        except (psycopg.OperationalError, PoolTimeout):
            # Before the stream starts this is a 503 ErrorResponse; during it, the stream ends
            # and the client reconnects with its last id, losing nothing.
            raise DependencyUnavailableError("database unreachable") from None

    async def _query_once(self, principal: Principal, sql: str, params: tuple) -> list[tuple]:
        assert self._pool is not None
        async with self._pool.connection(timeout=10) as conn, conn.transaction():
            await conn.execute(self._set_role)
            await conn.execute(
                "SELECT set_config('app.tenant_id', %s, true), set_config('app.user_id', %s, true)",
                (str(principal.tenant_id), str(principal.user_id)),
            )
            cur = conn.cursor(row_factory=tuple_row)
            await cur.execute(sql, params)
            return await cur.fetchall()

    async def positions(self, principal: Principal, account_id: str | None) -> dict[str, tuple[int, int]]:
        """Each live account's (last sequence, pruned floor), as RLS shows them to ``principal``."""
        sql = "SELECT id, change_seq, change_floor FROM accounts WHERE deleted_at IS NULL"
        params: tuple = ()
        if account_id is not None:
            sql += " AND id = %s"
            params = (account_id,)
        rows = await self._query(principal, sql, params)
        return {row[0]: (row[1], row[2]) for row in rows}

    async def read(self, principal: Principal, account_id: str, after: int, limit: int) -> list[tuple]:
        return await self._query(
            principal,
            "SELECT account_id, seq, entity, entity_id, kind, folder_id, detail, created_at FROM changes"
            " WHERE account_id = %s AND seq > %s ORDER BY seq LIMIT %s",
            (account_id, after, limit),
        )


# --- one stream ------------------------------------------------------------------------------


class EventStream:
    """One client's stream: opened (and refused with 400/404) before any byte is sent."""

    def __init__(
        self,
        hub: EventHub,
        sub: Subscription,
        position: dict[str, int],
        heads: dict[str, tuple[int, int]],
        max_catch_up: int,
        *,
        unknown_position: bool = False,
        ahead: list[str] | None = None,
    ) -> None:
        self.hub = hub
        self.sub = sub
        self.position = position
        self._heads = heads
        self.max_catch_up = max_catch_up
        # The client resumed from an id this service never issued: every account is resynced.
        self.unknown_position = unknown_position
        # Accounts the client's id puts past the log's head: each is resynced.
        self.ahead = ahead or []
        self._stopping = False

    @classmethod
    async def open(
        cls,
        hub: EventHub,
        principal: Principal,
        account_id: str | None,
        last_event_id: str | None,
        *,
        max_catch_up: int,
        max_per_user: int,
    ) -> EventStream:
        if account_id is not None and "\x00" in account_id:
            # PostgreSQL text cannot hold NUL, so no account's id has one (and the query would fail).
            raise NotFoundError(f"Account with ID '{account_id}' does not exist", code="ACCOUNT_NOT_FOUND")
        try:
            resume = decode_position(last_event_id) if last_event_id else None
            unreadable = False
        except BadRequestError:
            # Not an id this service issued (a proxy's, another service's, a corrupted one). A
            # browser's EventSource reconnects with it by itself and could never recover from a
            # 400; the stream starts from now and tells the client to resync every account.
            resume, unreadable = None, True
        await hub.start()
        # Subscribe before reading where the accounts stand, so no commit falls in between.
        sub = hub.subscribe(principal, account_id, max_per_user=max_per_user)
        try:
            heads = await hub.positions(principal, account_id)
            if account_id is not None and account_id not in heads:
                # Someone else's account looks exactly like one that does not exist.
                raise NotFoundError(f"Account with ID '{account_id}' does not exist", code="ACCOUNT_NOT_FOUND")
        except BaseException:
            hub.unsubscribe(sub)
            raise
        ahead: list[str] = []
        if resume is None:
            position = {account: seq for account, (seq, _floor) in heads.items()}
        else:
            # An account the id does not name was created after it was issued: all of its
            # entries are new to the client. A position past the head was not issued for this
            # log (the database lost entries the client saw, to a restore or a failover; or a
            # forged id): the client's copy holds changes the log does not, so it is told to
            # resync (as the changes feed answers CURSOR_UNKNOWN), and new entries still arrive.
            ahead = sorted(account for account, (seq, _floor) in heads.items() if resume.get(account, 0) > seq)
            position = {account: min(resume.get(account, 0), seq) for account, (seq, _floor) in heads.items()}
        return cls(hub, sub, position, heads, max_catch_up, unknown_position=unreadable, ahead=ahead)

    def close(self) -> None:
        self.hub.unsubscribe(self.sub)

    def stop(self) -> None:
        """End the stream at its next wait (the server is shutting down)."""
        self._stopping = True
        self.sub.wakeup.set()

    def _ready(self) -> StreamEvent:
        return StreamEvent("ready", {"accounts": sorted(self.position)}, encode_position(self.position))

    async def events(self, until: float | None = None) -> AsyncIterator[StreamEvent]:
        """``ready``, then what the client missed (if it resumed), then changes as they commit.

        The stream ends at ``until`` (a Unix time: when the credentials it was opened with
        expire), so a stream never outlives its token; the client reconnects with a fresh one and
        its last event id, and misses nothing.
        """
        try:
            yield self._ready()
            resync = sorted(self._heads) if self.unknown_position else self.ahead
            for account in resync:
                seq = self._heads[account][0]
                yield self._resync(account, seq, seq, "unknown_position")
            for account, (seq, floor) in sorted(self._heads.items()):
                async for event in self._advance(account, seq, floor, catching_up=True):
                    yield event
            while True:
                remaining = None if until is None else until - time.time()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    await asyncio.wait_for(self.sub.wakeup.wait(), timeout=remaining)
                except TimeoutError:
                    return
                if self._stopping:
                    return
                pending, everything = self.sub.take()
                heads = {account: (seq, 0) for account, seq in pending.items()}
                if everything:
                    heads.update(await self.hub.positions(self.sub.principal, self.sub.account_id))
                for account, (seq, floor) in sorted(heads.items()):
                    async for event in self._advance(account, seq, floor, catching_up=everything):
                        yield event
        finally:
            self.close()

    def _resync(self, account: str, after: int, head: int, reason: str) -> StreamEvent:
        # The client resyncs this account through the changes feed; the stream carries on from
        # the head, so a reconnect with this event's id does not ask for the same entries again.
        self.position[account] = head
        return StreamEvent(
            "resync",
            {"accountId": account, "seq": head, "reason": reason, "missed": head - after},
            encode_position(self.position),
        )

    async def _advance(self, account: str, head: int, floor: int, *, catching_up: bool) -> AsyncIterator[StreamEvent]:
        """Entries of ``account`` after the stream's position, up to at least ``head``.

        Catching up (on open, or after the LISTEN connection was lost) is bounded: past
        ``max_catch_up`` entries the client is told to resync instead of receiving them all. Live
        entries are not bounded: they are read and sent in batches as the client takes them.
        """
        after = self.position.get(account, 0)
        if head <= after:
            return
        if after < floor:
            yield self._resync(account, after, head, "pruned")
            return
        if catching_up and head - after > self.max_catch_up:
            yield self._resync(account, after, head, "too_far_behind")
            return
        while True:
            rows = await self.hub.read(self.sub.principal, account, after, READ_BATCH)
            if rows and rows[0][1] != after + 1:
                # Sequences have no holes, so a missing one was pruned while the client lagged.
                yield self._resync(account, after, max(head, rows[-1][1]), "pruned")
                return
            for row in rows:
                after = row[1]
                self.position[account] = after
                metrics.lag_since(metrics.EVENT_LAG, None if catching_up else row[7])  # replays are not lag
                yield _change_event(row, self.position)
            # A commit may have landed since the notification: read on until a short page.
            if len(rows) < READ_BATCH:
                return
