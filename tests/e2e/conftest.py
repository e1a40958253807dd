"""The service as deployed: `email-service serve` and `email-service worker` as separate processes.

They run against real PostgreSQL, Redis, the S3 server, Dovecot and aiosmtpd, with nothing of the
service in this process. The tests reach them only through the generated Python SDK.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import email_service_client as sdk
import psutil
import pytest
from helpers import ServiceProcess, service_env
from oauth2server import PROVIDER, RETURN_URL


class WorkerProcess:
    """`email-service worker` (or another process type) as its own process, writing to its log."""

    def __init__(self, env: dict[str, str], log_path: Path, command: str = "worker") -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "email_service", command],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """SIGKILL the worker and everything it started, as a lost machine or container would.

        RQ runs each job in a work horse with a session of its own, so the whole tree is collected
        first: killing the worker's process group alone would leave the job running.
        """
        worker = psutil.Process(self.proc.pid)
        tree = [worker, *worker.children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"still running after SIGKILL: {alive}"
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


@dataclass
class Deployment:
    api: ServiceProcess
    env: dict[str, str]
    directory: Path
    workers: list[WorkerProcess]
    watchers: list[WorkerProcess] = field(default_factory=list)

    @property
    def worker(self) -> WorkerProcess:
        return self.workers[-1]

    def start_worker(self) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.directory / "worker.log")
        self.workers.append(worker)
        return worker

    def start_watcher(self) -> WorkerProcess:
        watcher = WorkerProcess(self.env, self.directory / "watch.log", "watch")
        self.watchers.append(watcher)
        return watcher

    def mint_token(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> str:
        """A token from `email-service token`, the way an operator makes one."""
        done = subprocess.run(
            [sys.executable, "-m", "email_service", "token", "--tenant-id", str(tenant_id), "--user-id", str(user_id)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def client(self, token: str) -> sdk.ApiClient:
        configuration = sdk.Configuration(host=self.api.url, access_token=token)
        return sdk.ApiClient(configuration)

    def logs(self) -> str:
        """The tails of the API's and the workers' logs, for failure messages."""
        return self.api.log()[-6000:] + "\n--- workers ---\n" + self.worker.log_path.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def deployment(backing, dovecot, s3_server, oauth2_server, oauth2_dovecot, tmp_path_factory) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp("deployment")
    # The test authorization server is its OAuth2 provider; consent-flow accounts use its Dovecot.
    oauth2 = oauth2_server.provider_env()
    oauth2[f"EMAIL_SERVICE_OAUTH2_{PROVIDER.upper()}_IMAP"] = f"{oauth2_dovecot.host}:{oauth2_dovecot.imaps_port}/tls"
    oauth2["EMAIL_SERVICE_OAUTH2_RETURN_URLS"] = RETURN_URL
    # service_env passes the tests' allow-list: 127.0.0.1 only, where Dovecot and aiosmtpd listen.
    env = service_env(
        backing,
        EMAIL_SERVICE_CA_FILE=str(dovecot.ca_file),
        EMAIL_SERVICE_DATA_DIR=str(directory),
        EMAIL_SERVICE_VALIDATE_RESPONSES="true",
        EMAIL_SERVICE_SEND_RETRY_BASE_SECONDS="1",
        # The scheduler's leadership lease is three rounds: a replacement worker leads (and reaps
        # the dead one's task) within seconds of the old lease running out.
        EMAIL_SERVICE_SCHEDULER_SECONDS="2",
        EMAIL_SERVICE_WORKER_PROCESSES="2",
        EMAIL_SERVICE_SMTP_DATA_TIMEOUT_SECONDS="3",
        MINIO_ENDPOINT=s3_server.endpoint,
        MINIO_ACCESS_KEY=s3_server.access_key,
        MINIO_SECRET_KEY=s3_server.secret_key,
        MINIO_REGION=s3_server.region,
        MINIO_SECURE="false",
        MINIO_BUCKET=f"e2e-{uuid.uuid4().hex[:12]}",
        **oauth2,
    )
    api = ServiceProcess(env, directory, "--migrate")
    deployment = Deployment(api, env, directory, [])
    try:
        api.wait_healthy()
        deployment.start_worker()
        deployment.start_watcher()
        deployment.watchers.append(WorkerProcess(env, directory / "webhooks.log", "webhooks"))
        yield deployment
    finally:
        for worker in [*deployment.workers, *deployment.watchers]:
            worker.stop()
        assert api.stop() == 0, api.log()[-4000:]
