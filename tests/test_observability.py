"""What an operator sees: Prometheus metrics from every process, JSON log lines that follow a request into its job.

The service runs as an operator starts it (`email-service serve` on the embedded default, with
its worker, watcher and webhook dispatcher beside it), against the private Dovecot.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from helpers import ServiceProcess, account_body, service_env
from messages import plain_message, to_bytes
from syncing import imap_account
from test_embedded import mint
from test_processes import embedded_env, wait_for

METRICS_TOKEN = "metrics-" + "t" * 24


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total, found = total + float(match.group(3)), True
    assert found, f"no sample of {name} {labels}"
    return total


def _json_lines(text: str) -> list[dict]:
    lines = []
    for raw in text.splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    return lines


@pytest.fixture(scope="module")
def running(tmp_path_factory, dovecot):
    """serve on the embedded default, JSON logs, metrics behind a token; one synced account."""
    tmp_path = tmp_path_factory.mktemp("observed")
    env = embedded_env(tmp_path / "var", dovecot)
    env.update(EMAIL_SERVICE_LOG_FORMAT="json", EMAIL_SERVICE_METRICS_TOKEN=METRICS_TOKEN)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    api = ServiceProcess(env, tmp_path)
    try:
        api.wait_healthy()
        mailbox = dovecot.add_user()
        dovecot.append(mailbox, "INBOX", to_bytes(plain_message("Counted and logged")))
        tenant_id = uuid.uuid4()
        headers = {"Authorization": f"Bearer {mint(env, tenant_id, uuid.uuid4())}"}
        body = imap_account(dovecot, mailbox)
        created = httpx.post(api.url + "/api/accounts", json=body, headers=headers, timeout=10)
        assert created.status_code == 201, created.text
        account_id = created.json()["id"]
        sync = httpx.post(
            f"{api.url}/api/sync/{account_id}", json={}, headers={**headers, "X-Request-ID": "sync-req-42"}, timeout=10
        )
        task_id = sync.json()["taskId"]

        def finished():
            status = httpx.get(f"{api.url}/api/sync/task/{task_id}", headers=headers, timeout=10).json()
            return status if status["status"] in ("success", "failure") else None

        status = wait_for(finished, 90, "the sync did not finish")
        assert status["status"] == "success", status
        yield {
            "api": api,
            "sync": sync,
            "tenant_id": str(tenant_id),
            "account_id": account_id,
            "task_id": task_id,
            "mailbox": mailbox,
            "headers": headers,
        }
    finally:
        api.stop()


def test_metrics_need_the_token(running):
    url = running["api"].url + "/metrics"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong-token-of-some-length"}, timeout=10).status_code == 401
    # An API token is not a metrics token.
    assert httpx.get(url, headers=running["headers"], timeout=10).status_code == 401


def test_metrics_of_the_api_the_worker_and_the_queues_in_one_scrape(running):
    url = running["api"].url + "/metrics"
    answer = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=30)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    # The API process: requests by operationId, method and status, and their latency.
    requests = "email_service_http_requests_total"
    assert _metric(text, requests, operation="createAccount", method="POST", status="201") == 1
    assert _metric(text, requests, operation="getSyncStatus", method="GET", status="200") >= 1
    assert _metric(text, "email_service_http_request_duration_seconds_count", operation="createAccount") == 1
    # The worker's job (in a process forked by RQ): outcome, duration, queue wait, what it synced.
    assert _metric(text, "email_service_jobs_total", kind="sync", outcome="success") >= 1
    assert _metric(text, "email_service_job_duration_seconds_count", kind="sync", outcome="success") >= 1
    assert _metric(text, "email_service_job_queue_wait_seconds_count", kind="sync") >= 1
    # The sync job and the watcher both bring the message in; whichever comes first adds it.
    assert _metric(text, "email_service_sync_messages_total", protocol="imap", change="added") >= 1
    assert _metric(text, "email_service_sync_fetched_bytes_total", protocol="imap") > 100
    # Read from Redis and PostgreSQL at the scrape.
    assert _metric(text, "email_service_queue_depth", queue="sync") >= 0
    assert "email_service_queue_scheduled" in text
    # Nothing that names whose mail it is.
    for private in (running["tenant_id"], running["account_id"], running["mailbox"].name, "@"):
        assert private not in text


def test_a_failed_login_is_counted_by_category(running, dovecot):
    api, headers = running["api"], running["headers"]
    mailbox = dovecot.add_user()
    body = {**imap_account(dovecot, mailbox), "password": "not-the-password"}
    created = httpx.post(api.url + "/api/accounts", json=body, headers=headers, timeout=10).json()
    task = httpx.post(f"{api.url}/api/sync/{created['id']}", json={}, headers=headers, timeout=10).json()
    wait_for(
        lambda: (
            httpx.get(f"{api.url}/api/sync/task/{task['taskId']}", headers=headers, timeout=10).json()["status"]
            == "failure"
        ),
        60,
        "the sync did not fail",
    )
    text = httpx.get(api.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=30).text
    assert _metric(text, "email_service_mail_connection_errors_total", protocol="imap", category="authentication") >= 1
    assert _metric(text, "email_service_jobs_total", kind="sync", outcome="failure") >= 1


def test_request_id_is_echoed_and_its_lines_carry_it_with_the_tenant(running):
    assert running["sync"].headers["X-Request-ID"] == "sync-req-42"
    lines = _json_lines(running["api"].log())
    assert lines, running["api"].log()[-2000:]
    for line in lines:
        assert {"timestamp", "level", "logger", "message"} <= line.keys(), line
    access = [
        line for line in lines if line.get("request_id") == "sync-req-42" and line["logger"] == "email_service.access"
    ]
    assert len(access) == 1, access
    assert access[0]["tenant_id"] == running["tenant_id"]
    assert access[0]["account_id"] == running["account_id"]
    assert access[0]["operation"] == "syncAccount" and access[0]["status"] == running["sync"].status_code


def test_the_job_a_request_enqueued_logs_with_its_request_id(running):
    lines = _json_lines(running["api"].log())
    job_lines = [line for line in lines if line.get("task_id") == running["task_id"]]
    assert job_lines, [line for line in lines if "task_id" in line][:5]
    assert {line.get("request_id") for line in job_lines} == {"sync-req-42"}
    assert all(line["tenant_id"] == running["tenant_id"] for line in job_lines)
    # RQ's own lines come out as JSON too.
    assert any(line["logger"].startswith("rq.") for line in lines)


def test_logs_hold_no_password_or_token(running, dovecot):
    log = running["api"].log()
    assert running["mailbox"].password not in log
    assert running["headers"]["Authorization"].removeprefix("Bearer ") not in log
    assert METRICS_TOKEN not in log


def test_an_unusable_request_id_is_replaced_by_one_made_up(client):
    plain = client.get("/health")
    assert re.fullmatch(r"[0-9a-f]{32}", plain.headers["X-Request-ID"])
    odd = client.get("/health", headers={"X-Request-ID": "bad id\n" + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["X-Request-ID"])
    kept = client.get("/health", headers={"X-Request-ID": "abc-123.def"})
    assert kept.headers["X-Request-ID"] == "abc-123.def"


def test_token_prints_the_token_and_nothing_else(tmp_path):
    command = ["token", "--tenant-id", str(uuid.uuid4()), "--user-id", str(uuid.uuid4())]
    done = subprocess.run(
        [sys.executable, "-m", "email_service", *command],
        env={"PATH": "/usr/bin:/bin", "EMAIL_SERVICE_DATA_DIR": str(tmp_path / "var")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.count(".") == 2  # a JWT


def test_worker_prints_no_deprecation_warnings(tmp_path, backing):
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": backing.database_url,
        "REDIS_URL": backing.redis_url,
        "JWT_SECRET": backing.jwt_secret,
        "CREDENTIAL_KEYS": ",".join(backing.credential_keys),
        "EMAIL_SERVICE_WORKER_PROCESSES": "1",
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "email_service", "worker", "--burst"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Warning" not in done.stderr and "Warning" not in done.stdout, done.stderr[-3000:]
    assert time.monotonic() - started < 120


def test_a_rate_limited_request_is_counted_by_operation(client, user):
    """In one process (no multiprocess directory): the app's own metrics, by the spec's operationId."""
    from prometheus_client import REGISTRY

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    rejected = ("email_service_rate_limit_rejections_total", {"operation": "createAccount"})
    before = sample(rejected[0], **rejected[1])
    statuses = [client.post("/api/accounts", json=account_body(), headers=user.headers).status_code for _ in range(11)]
    assert statuses.count(429) == 1
    assert sample(rejected[0], **rejected[1]) == before + 1
    labels = {"operation": "createAccount", "method": "POST", "status": "429"}
    assert sample("email_service_http_requests_total", **labels) >= 1


def test_text_access_lines_leave_out_query_strings_and_quote_paths(tmp_path):
    # Text logs, the default: a signed link's signature or an OAuth2 callback's code in a query
    # string is a credential, and whoever reads the log must not be able to use it.
    env = service_env(None, EMAIL_SERVICE_DATA_DIR=str(tmp_path / "var"))
    api = ServiceProcess(env, tmp_path)
    signature, code = f"sig{uuid.uuid4().hex}", f"code{uuid.uuid4().hex}"
    try:
        api.wait_healthy()
        headers = {"Authorization": f"Bearer {mint(env, uuid.uuid4(), uuid.uuid4())}"}
        link = httpx.get(f"{api.url}/storage/objects?key=k&expires=1&signature={signature}", timeout=10)
        callback = httpx.get(f"{api.url}/api/oauth2/callback?state=s&code={code}", timeout=10)
        assert link.status_code >= 400 and callback.status_code >= 400
        assert httpx.get(f"{api.url}/api/accounts?limit=7", headers=headers, timeout=10).status_code == 200
        # A decoded %0A in the path must not start a line of its own.
        forged = httpx.get(f"{api.url}/api/accounts/x%0AFORGED-LINE", headers=headers, timeout=10)
        assert forged.status_code == 404
    finally:
        api.stop()
    log = api.log()
    assert signature not in log and code not in log
    assert re.search(r"email_service\.access: GET /api/accounts 200 \d+ ms \(listAccounts\)", log), log[-3000:]
    assert "limit=7" not in log
    assert "/api/accounts/x%0AFORGED-LINE 404" in log
    assert not any(line.startswith("FORGED-LINE") for line in log.splitlines())
