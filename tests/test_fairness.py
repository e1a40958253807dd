"""One tenant's hung server and failing accounts do not hold up another tenant's sync and send.

The test worker runs two processes with a 10 s IMAP timeout, and the API lets one job per tenant
be queued or running at once (``tenant_concurrency=1`` in the test settings).
"""

from __future__ import annotations

import time

import pytest
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
