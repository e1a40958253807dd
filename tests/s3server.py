"""A real S3-compatible server for tests, installed on first use and started on a free local port.

The presigned-link tests need a server that checks SigV4 signatures and expiry the way S3 does.
What was tried:

- ``s3rver`` (npm, 3.7.1) checks only SigV2 signatures: a SigV4 URL with a tampered signature,
  and even a request with no signature at all, is served.
- its fork ``@20minutes/s3rver`` (npm, 4.0.4) checks SigV4, but encodes signed query values with
  JavaScript's ``encodeURIComponent`` instead of RFC 3986, so it refuses genuine URLs whose
  ``response-content-disposition`` holds ``'``, ``*``, ``(`` or ``)``: every ``filename*=UTF-8''..``.
- ``ministack`` (PyPI) verifies SigV4 presigned URLs (RFC 3986 canonical form) and their expiry,
  and runs in-process with no Docker: this is the one used.

ministack pins its own dependencies (botocore, graphql-core) and so lives in a virtualenv of its
own under a cache directory (``EMAIL_SERVICE_TEST_CACHE``, default ``~/.cache/email-service-tests``),
made once with this interpreter's ``venv`` and ``pip``; nothing is installed into the test venv.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import urllib3
from minio import Minio

from email_service.api.app import create_app
from email_service.runtime import Runtime
from email_service.storage.minio_store import MinioStore

MINISTACK_REQUIREMENT = "ministack==1.5.33"
# The server's root account; ministack verifies presigned URLs against this secret.
ACCESS_KEY = "email-service-tests"
SECRET_KEY = secrets.token_hex(20)
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # host:port, as MINIO_ENDPOINT takes it
    access_key: str
    secret_key: str
    region: str
    directory: Path

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"


def _cache_dir() -> Path:
    root = os.environ.get("EMAIL_SERVICE_TEST_CACHE") or Path.home() / ".cache" / "email-service-tests"
    return Path(root)


def install_ministack() -> Path:
    """The ``ministack`` command of a virtualenv made on first use (safe across concurrent runs)."""
    venv = _cache_dir() / ("ministack-" + MINISTACK_REQUIREMENT.split("==")[1])
    command = venv / "bin" / "ministack"
    marker = venv / ".installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / ".ministack.lock").open("w") as lock:
        # Two test runs at once would otherwise build the same virtualenv together.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            steps = (
                [sys.executable, "-m", "venv", "--clear", str(venv)],
                [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", MINISTACK_REQUIREMENT],
            )
            for step in steps:
                result = subprocess.run(step, capture_output=True, text=True)
                if result.returncode != 0:
                    pytest.fail(f"could not install {MINISTACK_REQUIREMENT}:\n{result.stdout}{result.stderr}")
            marker.write_text(MINISTACK_REQUIREMENT)
    return command


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.HTTPError:
        return False
    return True


def _start(command: Path, directory: Path, log_path: Path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "GATEWAY_PORT": str(port),
        "BIND_HOST": "127.0.0.1",
        "SERVICES": "s3",
        "LOG_LEVEL": "WARNING",
        # Whatever it writes stays in this run's directory.
        "TMPDIR": str(directory),
        "S3_DATA_DIR": str(directory / "s3"),
        "STATE_DIR": str(directory / "state"),
    }
    with log_path.open("ab") as log:
        # A session of its own, so stopping it stops anything it started too.
        proc = subprocess.Popen(
            [str(command)], env=env, cwd=directory, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not _answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"ministack did not answer on {url}:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{port}"


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running S3-compatible server with its own empty directory, stopped at the end of the session."""
    command = install_ministack()
    directory = tmp_path_factory.mktemp("s3server")
    log_path = directory / "server.log"
    for attempt in range(3):
        try:
            proc, endpoint = _start(command, directory, log_path)
            break
        except RuntimeError:
            # Another process may have taken the free port between our look and its bind.
            if attempt == 2:
                raise
    try:
        yield S3Server(endpoint, ACCESS_KEY, SECRET_KEY, REGION, directory)
    finally:
        _stop(proc)


def unreachable_store() -> MinioStore:
    """A MinIO/S3 store whose server is down: its port refuses connections (one retry, to be quick)."""
    client = Minio(
        f"127.0.0.1:{_free_port()}",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        secure=False,
        region=REGION,
        http_client=urllib3.PoolManager(retries=urllib3.Retry(total=1, backoff_factor=0)),
    )
    return MinioStore(client, "email-service-down")


@pytest.fixture
def storage_down_client(backing):
    """A test client of an app whose object storage cannot be reached (rate limits off)."""
    runtime = Runtime.build(replace(backing, rate_limits_enabled=False))
    runtime.objects = unreachable_store()
    try:
        with create_app(runtime).test_client() as client:
            yield client
    finally:
        runtime.close()
