"""Fixtures and helpers for tests that sync real mailboxes: a worker process and a client to poll with."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import pytest
from helpers import TEST_DESTINATIONS, service_env
from sqlalchemy import select

from email_service.api.app import create_app
from email_service.models import Task, TaskKind, TaskStatus
from email_service.protocols.imap import ImapSession
from email_service.queue.tasks import new_task_id
from email_service.runtime import Runtime


@pytest.fixture(scope="session")
def sync_client(backing):
    """Polling a task every 50 ms would trip the per-user limits, which have tests of their own."""
    runtime = Runtime.build(replace(backing, rate_limits_enabled=False))
    with create_app(runtime).test_client() as test_client:
        yield test_client
    runtime.close()


@pytest.fixture(scope="session")
def worker(backing, dovecot, oauth2_server, tmp_path_factory):
    """`email-service worker` as its own process, trusting the test servers' CA.

    ``service_env`` hands it the tests' allow-list (127.0.0.1, where every test server listens);
    the test authorization server is its OAuth2 provider ``testidp``.
    """
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    env = worker_env(backing, dovecot, **oauth2_server.provider_env())
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "email_service", "worker", "--no-scheduler"], env=env, stdout=log, stderr=log
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def worker_env(backing, dovecot, **extra: str) -> dict[str, str]:
    """What the test workers run with: the test servers' CA, two processes, short timeouts."""
    return service_env(
        backing,
        EMAIL_SERVICE_CA_FILE=str(dovecot.ca_file),
        EMAIL_SERVICE_DATA_DIR=str(backing.data_dir),
        EMAIL_SERVICE_STORAGE_KEY=backing.storage_signing_key,
        EMAIL_SERVICE_WORKER_PROCESSES="2",
        EMAIL_SERVICE_IMAP_TIMEOUT_SECONDS="10",
        EMAIL_SERVICE_SMTP_TIMEOUT_SECONDS="10",
        EMAIL_SERVICE_SMTP_DATA_TIMEOUT_SECONDS="4",
        EMAIL_SERVICE_SEND_RETRY_BASE_SECONDS="1",
        **extra,
    )


def imap_account(dovecot, mail_user, **overrides) -> dict:
    body = {
        "accountName": "Test IMAP",
        "emailAddress": f"{mail_user.name}@example.com",
        "protocol": "imap",
        "hostname": dovecot.host,
        "port": dovecot.imaps_port,
        "encryption": "tls",
        "username": mail_user.name,
        "password": mail_user.password,
        "isSyncEnabled": False,
    }
    body.update(overrides)
    return body


def imap_session(dovecot, mail_user) -> ImapSession:
    """The service's own IMAP session to a test user's mailbox (for a ``with`` block)."""
    return ImapSession(
        dovecot.host,
        dovecot.imaps_port,
        "tls",
        mail_user.name,
        mail_user.password,
        ca_file=dovecot.ca_file,
        destinations=TEST_DESTINATIONS,
    )


def smtp_account(dovecot, mail_user, smtp, **overrides) -> dict:
    """An IMAP account on Dovecot that sends through ``smtp`` (STARTTLS with AUTH)."""
    return imap_account(
        dovecot,
        mail_user,
        smtpHostname=dovecot.host,
        smtpPort=smtp.port,
        smtpEncryption="starttls",
        smtpUsername=smtp.username,
        smtpPassword=smtp.password,
        **overrides,
    )


def add_task(runtime, user, account_id, **values) -> str:
    """A task row written directly, as a worker would have left it: a sync of the account, started."""
    row = dict(
        id=new_task_id(),
        tenant_id=user.principal.tenant_id,
        user_id=user.principal.user_id,
        account_id=account_id,
        kind=TaskKind.SYNC,
        status=TaskStatus.STARTED,
        params={},
        progress=10,
        attempts=1,
        abandoned=0,
    )
    row.update(values)
    with runtime.db.maintenance_session() as session:
        session.add(Task(**row))
    return row["id"]


def tasks_of(runtime, account_id) -> list[Task]:
    """Every task of the account, oldest first."""
    with runtime.db.maintenance_session() as session:
        return list(session.scalars(select(Task).where(Task.account_id == account_id).order_by(Task.created_at)))


def scripted_account(port: int, name: str, **overrides) -> dict:
    """An IMAP account on a scripted server at 127.0.0.1:``port`` (plain text, any login)."""
    body = {
        "accountName": name,
        "emailAddress": f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}@example.com",
        "protocol": "imap",
        "hostname": "127.0.0.1",
        "port": port,
        "encryption": "none",
        "username": "someone",
        "password": "secret-password",
        "isSyncEnabled": False,
    }
    body.update(overrides)
    return body


def create_account(client, user, body) -> str:
    response = client.post("/api/accounts", json=body, headers=user.headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def run_sync(client, user, account_id, body=None, timeout=120) -> tuple[dict, list[int]]:
    """Start a sync and poll it to the end; returns the final status and every progress value seen."""
    started = client.post(f"/api/sync/{account_id}", json=body or {}, headers=user.headers)
    assert started.status_code == 202, started.text
    task_id = started.json()["taskId"]
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/sync/task/{task_id}", headers=user.headers).json()
        seen.append(status["progress"])
        if status["status"] in ("success", "failure"):
            return status, seen
        time.sleep(0.05)
    raise AssertionError(f"sync did not finish in {timeout}s: {status}")


def folders_by_name(client, user, account_id) -> dict[str, dict]:
    response = client.get(f"/api/{account_id}/folders", headers=user.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] == len(body["folders"])
    return {f["name"]: f for f in body["folders"]}


def messages(client, user, account_id, folder_id, **query) -> dict:
    response = client.get(f"/api/{account_id}/folders/{folder_id}/messages", params=query, headers=user.headers)
    assert response.status_code == 200, response.text
    return response.json()


def wait_task(client, user, task_id, timeout=60, until=("success", "failure")) -> dict:
    """Poll a task until its status is one of ``until``; returns the last status seen."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = client.get(f"/api/sync/task/{task_id}", headers=user.headers).json()
        if status["status"] in until:
            return status
        time.sleep(0.1)
    raise AssertionError(f"task still {status} after {timeout}s")


class SilentServer:
    """A TCP listener on 127.0.0.1 that accepts connections and never says a word: a hung mail server."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self.connections:
            conn.close()
        self.listener.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()


@contextmanager
def watcher(backing, dovecot, log_path, **extra: str):
    """`email-service watch` as its own process, with the test workers' settings and ``extra``."""
    env = worker_env(backing, dovecot, **extra)
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "email_service", "watch"], env=env, stdout=log, stderr=log)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def eventually(condition, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    return condition()


def inbox_subjects(client, user, account_id) -> dict[str, dict]:
    folders = client.get(f"/api/{account_id}/folders", headers=user.headers).json().get("folders", [])
    inbox = next((f for f in folders if f["name"] == "INBOX"), None)
    if inbox is None:
        return {}
    listed = client.get(f"/api/{account_id}/folders/{inbox['id']}/messages", headers=user.headers).json()
    return {m["subject"]: m for m in listed["messages"]}
