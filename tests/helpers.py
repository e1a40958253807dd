"""Helpers shared by the tests: users with tokens, request bodies, error-shape checks, child services."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from email_service.api.auth import TokenVerifier
from email_service.config import Settings
from email_service.db import sqlalchemy_url
from email_service.protocols.destinations import DestinationPolicy, parse_allowed
from email_service.tenancy import Principal

JWT_SECRET = "test-secret-" + "x" * 40
CREDENTIAL_KEY = Fernet.generate_key().decode()
# The test Dovecot, aiosmtpd and the misbehaving servers of the failure tests all listen on
# 127.0.0.1 (on ports chosen at run time): that one address, and nothing else, is opened.
# ::1, 0.0.0.0 and the rest of 127.0.0.0/8 stay refused.
ALLOWED_DESTINATIONS = "127.0.0.1"
TEST_DESTINATIONS = DestinationPolicy(parse_allowed(ALLOWED_DESTINATIONS))


def base_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict = dict(
        data_dir=data_dir,
        database_url=None,
        redis_url=None,
        jwt_secret=JWT_SECRET,
        jwt_issuer=None,
        jwt_audience=None,
        credential_keys=(CREDENTIAL_KEY,),
        storage_signing_key="test-storage-links-" + "k" * 32,
        send_retry_base_seconds=1,
        # One queued or running job per tenant: tests see the fairness limit at its tightest.
        tenant_concurrency=1,
        validate_responses=True,
        destinations=TEST_DESTINATIONS,
    )
    values.update(overrides)
    return Settings(**values)


def libpq_url(url: str) -> str:
    return sqlalchemy_url(url).replace("postgresql+psycopg://", "postgresql://", 1)


class User:
    """A tenant's user with a valid token; ``headers`` authenticate as them."""

    def __init__(self, verifier: TokenVerifier, tenant_id: uuid.UUID | None = None) -> None:
        self.principal = Principal(tenant_id=tenant_id or uuid.uuid4(), user_id=uuid.uuid4())
        self.token = verifier.issue(self.principal.tenant_id, self.principal.user_id, 3600, time.time())
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def colleague(self, verifier: TokenVerifier) -> User:
        """Another user of the same tenant."""
        return User(verifier, self.principal.tenant_id)


def account_body(**overrides: object) -> dict:
    body = {
        "accountName": "Work Email",
        "emailAddress": f"user-{uuid.uuid4().hex[:10]}@example.com",
        "protocol": "imap",
        "hostname": "imap.example.com",
        "port": 993,
        "encryption": "tls",
        "username": "user@example.com",
        "password": "correct horse battery staple",
        "isSyncEnabled": True,
        "syncInterval": 300,
    }
    body.update(overrides)
    return body


def assert_error_shape(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) <= {"error", "message", "code", "timestamp"}
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["timestamp"], int) and abs(body["timestamp"] - time.time() * 1000) < 60_000
    assert "Traceback" not in response.text
    if code is not None:
        assert body["code"] == code
    return body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """``email-service serve`` in a child process, as an operator would start it."""

    def __init__(self, env: dict[str, str], cwd: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = cwd / f"serve-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "email_service", "serve", "--port", str(self.port), *args],
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_healthy(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"service not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def service_env(settings: Settings | None, **extra: str) -> dict[str, str]:
    """A clean environment for a child service: only what it is meant to see."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "JWT_", "CREDENTIAL_"))}
    if settings is not None:
        env.update(
            DATABASE_URL=settings.database_url,
            REDIS_URL=settings.redis_url,
            JWT_SECRET=settings.jwt_secret,
            CREDENTIAL_KEYS=",".join(settings.credential_keys),
            EMAIL_SERVICE_ALLOWED_DESTINATIONS=",".join(str(entry) for entry in settings.destinations.allowed),
        )
    env.update(extra)
    return env


def ensure_debian_packages(needed: tuple[str, ...], packages: tuple[str, ...]) -> None:
    """Install Debian ``packages`` with apt-get unless every path in ``needed`` exists already."""
    if all(os.path.exists(path) for path in needed):
        return
    if os.geteuid() != 0:
        pytest.fail(f"{needed[0]} is missing and installing it needs root: apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Parallel pytest sessions on one machine would otherwise fight over apt's locks.
    with open("/tmp/email-service-apt-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(os.path.exists(path) for path in needed):
            return
        policy = subprocess.run(
            ["apt-cache", "policy", *packages], capture_output=True, text=True, env=env, check=False
        )
        if policy.returncode != 0 or "Candidate: (none)" in policy.stdout or "Candidate:" not in policy.stdout:
            # A fresh machine has no package lists yet.
            _run_apt(["apt-get", "update"], env)
        _run_apt(["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", *packages], env)
    missing = [path for path in needed if not os.path.exists(path)]
    if missing:
        pytest.fail(f"apt-get installed {packages} but {missing} are still missing")


def _run_apt(argv: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
