"""Fixtures and helpers for tests that sync real mailboxes: a worker process and a client to poll with."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace

import pytest
from helpers import service_env

from email_service.api.app import create_app
from email_service.runtime import Runtime


@pytest.fixture(scope="session")
def sync_client(backing):
    """Polling a task every 50 ms would trip the per-user limits, which have tests of their own."""
    runtime = Runtime.build(replace(backing, rate_limits_enabled=False))
    with create_app(runtime).test_client() as test_client:
        yield test_client
    runtime.close()


@pytest.fixture(scope="session")
def worker(backing, dovecot, tmp_path_factory):
    """`email-service worker` as its own process, trusting the test servers' CA.

    ``service_env`` hands it the tests' allow-list (127.0.0.1, where every test server listens).
    """
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    env = service_env(
        backing,
        EMAIL_SERVICE_CA_FILE=str(dovecot.ca_file),
        EMAIL_SERVICE_DATA_DIR=str(backing.data_dir),
        EMAIL_SERVICE_STORAGE_KEY=backing.storage_signing_key,
    )
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
