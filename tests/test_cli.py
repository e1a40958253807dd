"""The command line: its commands, tokens, key rotation, and one clear line for bad settings."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import jwt
import pytest
from cryptography.fernet import Fernet
from helpers import JWT_SECRET, account_body, service_env
from sqlalchemy import text

from email_service.crypto import CredentialCipher


def run(env: dict, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "email_service", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_commands():
    result = run(service_env(None), "--help")
    assert result.returncode == 0
    for command in ("serve", "worker", "webhooks", "migrate", "token", "rotate-keys", "keygen"):
        assert command in result.stdout


GOOD = {
    "DATABASE_URL": "postgresql://u@127.0.0.1:1/db",
    "JWT_SECRET": JWT_SECRET,
    "CREDENTIAL_KEYS": Fernet.generate_key().decode(),
}


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        ({"DATABASE_URL": "mysql://u@h/db"}, "DATABASE_URL"),
        ({"REDIS_URL": "memcached://h"}, "REDIS_URL"),
        ({"JWT_SECRET": ""}, "JWT_SECRET"),
        ({"JWT_SECRET": "short"}, "JWT_SECRET"),
        ({"CREDENTIAL_KEYS": ""}, "CREDENTIAL_KEYS"),
        ({"CREDENTIAL_KEYS": "not-a-key-at-all"}, "CREDENTIAL_KEYS"),
        ({"EMAIL_SERVICE_MAX_BODY_BYTES": "lots"}, "EMAIL_SERVICE_MAX_BODY_BYTES"),
        ({"EMAIL_SERVICE_RATE_LIMITS": "maybe"}, "EMAIL_SERVICE_RATE_LIMITS"),
        ({"MINIO_ENDPOINT": "minio:9000"}, "MINIO_ACCESS_KEY"),
        ({"MINIO_BUCKET": "X"}, "MINIO_BUCKET"),
        ({"EMAIL_SERVICE_WEBHOOK_RETRY_SCHEDULE": "5s,soon"}, "EMAIL_SERVICE_WEBHOOK_RETRY_SCHEDULE"),
        ({"EMAIL_SERVICE_WEBHOOK_TIMEOUT_SECONDS": "0"}, "EMAIL_SERVICE_WEBHOOK_TIMEOUT_SECONDS"),
    ],
)
def test_bad_settings_stop_start_up_with_one_clear_line(tmp_path, change, mentions):
    result = run(service_env(None, **{**GOOD, **change}), "serve", "--port", "1", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("email-service: error:") and mentions in lines[0]
    assert "Traceback" not in result.stderr
    if "not-a-key" in str(change):
        assert "not-a-key-at-all" not in result.stderr


@pytest.mark.parametrize("command", ["migrate", "rotate-keys"])
def test_unreachable_database_is_one_clear_line(tmp_path, command):
    result = run(service_env(None, **GOOD, REDIS_URL="redis://127.0.0.1:1"), command, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("email-service: error: cannot reach PostgreSQL at 127.0.0.1:1/db")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (("worker", "--processes", "-1"), "--processes"),
        (("worker", "--processes", "0"), "--processes"),
        (("serve", "--port", "70000"), "--port"),
        (("serve", "--port", "-5"), "--port"),
    ],
)
def test_out_of_range_numbers_are_refused_before_anything_starts(tmp_path, args, mentions):
    # Without a check, a pool of -1 processes exited at once with status 0 and port 70000 was
    # taken modulo 65536.
    result = run(service_env(None, **GOOD), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert mentions in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


def test_token_prints_a_jwt_the_service_accepts(backing):
    tenant, user = uuid.uuid4(), uuid.uuid4()
    result = run(service_env(backing), "token", "--tenant-id", str(tenant), "--user-id", str(user), "--ttl", "120")
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == str(user) and claims["tenant_id"] == str(tenant)
    assert 100 < claims["exp"] - time.time() <= 121
    bad = run(service_env(backing), "token", "--tenant-id", "acme", "--user-id", str(user))
    assert bad.returncode == 2 and "UUID" in bad.stderr


def test_keygen_prints_a_usable_key():
    key = run(service_env(None), "keygen").stdout.strip()
    assert CredentialCipher((key,)).decrypt(CredentialCipher((key,)).encrypt("x")) == "x"


def test_rotate_keys_command_reencrypts_under_the_newest_key(backing, client, user, runtime):
    account = client.post("/api/accounts", json=account_body(password="rotate-me-please"), headers=user.headers)
    old = backing.credential_keys[0]
    new = Fernet.generate_key().decode()
    result = run(service_env(backing, CREDENTIAL_KEYS=f"{new},{old}"), "rotate-keys")
    assert result.returncode == 0, result.stderr
    assert "re-encrypted" in result.stdout and "rotate-me-please" not in result.stdout + result.stderr
    with runtime.db.tenant_session(user.principal) as session:
        token = session.execute(
            text("SELECT password_encrypted FROM accounts WHERE id = :id"), {"id": account.json()["id"]}
        ).scalar_one()
    assert CredentialCipher((new,)).decrypt(token) == "rotate-me-please"
    # Back under the suite's key for the tests that follow.
    assert run(service_env(backing, CREDENTIAL_KEYS=f"{old},{new}"), "rotate-keys").returncode == 0


def test_worker_processes_that_keep_dying_are_replaced_after_a_growing_pause(tmp_path):
    # With Redis away every worker process dies as it starts, and the pool started a new one each
    # second for each: a tight loop of forks and tracebacks for as long as the outage lasted.
    env = service_env(None, **GOOD, REDIS_URL="redis://127.0.0.1:1")
    pool = subprocess.Popen(
        [sys.executable, "-m", "email_service", "worker", "--no-scheduler", "--processes", "2"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(12)
    pool.terminate()
    output, _ = pool.communicate(timeout=60)
    deaths = output.count(" is dead")
    # Two at once, two after 2 s, two after 8 s more: not two a second (about 24 in 12 s).
    assert 2 <= deaths <= 10, output[-3000:]
    assert "none is started for" in output
