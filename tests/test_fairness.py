"""One tenant's hung server and failing accounts do not hold up another tenant's sync and send.

The test worker runs two processes with a 10 s IMAP timeout, and the API lets one job per tenant
be queued or running at once (``tenant_concurrency=1`` in the test settings).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import ServiceProcess, service_env
from messages import plain_message, to_bytes
from syncing import create_account, imap_account, smtp_account, wait_task


@pytest.fixture
def client(sync_client):
    return sync_client


def start_sync(client, user, account_id) -> str:
    response = client.post(f"/api/sync/{account_id}", json={}, headers=user.headers)
    assert response.status_code == 202, response.text
    return response.json()["taskId"]


def test_a_hung_server_and_failing_accounts_of_one_tenant_leave_another_tenant_unhindered(
    client, make_user, dovecot, smtp_server, worker, silent_server
):
    noisy, quiet = make_user(), make_user()
    # The noisy tenant: two accounts whose server accepts and never answers (enough to occupy every
    # worker process for the whole timeout, were there no limit), three that fail to log in.
    hung = [
        create_account(
            client,
            noisy,
            imap_account(dovecot, dovecot.add_user(), hostname="127.0.0.1", port=silent_server.port, encryption="none"),
        )
        for _ in range(2)
    ]
    failing = [
        create_account(client, noisy, imap_account(dovecot, dovecot.add_user(), password="not-the-password"))
        for _ in range(3)
    ]
    hung_tasks = [start_sync(client, noisy, account_id) for account_id in hung]
    failing_tasks = [start_sync(client, noisy, account_id) for account_id in failing]
    hung_task = hung_tasks[0]
    wait_task(client, noisy, hung_task, until=("started",), timeout=30)

    # The quiet tenant syncs and sends meanwhile.
    mailbox = dovecot.add_user()
    dovecot.append(mailbox, "INBOX", to_bytes(plain_message("Fresh mail")))
    smtp = smtp_server("starttls")
    account_id = create_account(client, quiet, smtp_account(dovecot, mailbox, smtp))
    began = time.monotonic()
    sync_task = start_sync(client, quiet, account_id)
    sent = client.post(
        "/api/compose/send",
        json={"accountId": account_id, "to": ["bob@example.org"], "subject": "Not held up", "body": "Hi"},
        headers=quiet.headers,
    )
    assert sent.status_code == 202, sent.text
    synced = wait_task(client, quiet, sync_task, timeout=30)
    delivered = wait_task(client, quiet, sent.json()["taskId"], timeout=30)
    took = time.monotonic() - began
    assert synced["status"] == "success" and synced["result"]["messagesAdded"] == 1
    assert delivered["status"] == "success" and len(smtp.messages) == 1
    # Done while the noisy tenant's hung sync still holds its one slot.
    still = client.get(f"/api/sync/task/{hung_task}", headers=noisy.headers).json()
    assert still["status"] == "started", (still, took)
    assert took < 9, took

    # The noisy tenant's own work ends in words, one job at a time, bounded by the timeout.
    for task_id in hung_tasks:
        hung_status = wait_task(client, noisy, task_id, timeout=40)
        assert hung_status["status"] == "failure" and "did not answer in time" in hung_status["error"]
    for task_id in failing_tasks:
        status = wait_task(client, noisy, task_id, timeout=60)
        assert status["status"] == "failure" and status["error"].startswith("authentication failed")


def test_requests_waiting_on_one_users_hung_servers_leave_the_api_to_everyone_else(
    backing, tmp_path, make_user, dovecot, silent_server
):
    # Creating a folder talks to the account's server inside the request, and the API answers
    # from ten threads: ten such requests to servers that never answer took every thread for
    # the whole IMAP timeout, and every other tenant's requests waited behind them.
    server = ServiceProcess(
        service_env(backing, EMAIL_SERVICE_IMAP_TIMEOUT_SECONDS="15", EMAIL_SERVICE_RATE_LIMITS="false"),
        tmp_path,
        "--no-embedded-worker",
    )
    noisy, quiet = make_user(), make_user()
    try:
        server.wait_healthy()
        with httpx.Client(base_url=server.url, timeout=60) as api:
            hung = []
            for _ in range(10):
                body = imap_account(dovecot, dovecot.add_user(), hostname="127.0.0.1", port=silent_server.port)
                body["encryption"] = "none"
                created = api.post("/api/accounts", json=body, headers=noisy.headers)
                assert created.status_code == 201, created.text
                hung.append(created.json()["id"])
            with ThreadPoolExecutor(len(hung)) as pool:
                waiting = [
                    pool.submit(api.post, f"/api/{account_id}/folders", json={"name": "Held"}, headers=noisy.headers)
                    for account_id in hung
                ]
                time.sleep(2)  # every one of them has reached the API by now
                began = time.monotonic()
                listed = api.get("/api/accounts", headers=quiet.headers)
                took = time.monotonic() - began
                answers = [future.result() for future in waiting]
        assert listed.status_code == 200 and listed.json()["accounts"] == []
        assert took < 5, took  # not after the 15 s the hung requests wait
        # The user's own requests: two wait on the servers and end in words; the rest are told at once.
        codes = sorted((answer.status_code, answer.json()["code"]) for answer in answers)
        assert codes[:8] == [(429, "TOO_MANY_SERVER_CALLS")] * 8, codes
        assert [status for status, _ in codes[8:]] == [503, 503], codes
    finally:
        server.stop()
