"""Commands sharing one embedded data directory, and what happens when one of them dies.

Everything runs as an operator would: `email-service serve`, `worker`, `migrate` and
`rotate-keys` as processes on the embedded default (pgserver and Redis under the data dir).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import httpx
import psutil
import pytest
from helpers import ALLOWED_DESTINATIONS, ServiceProcess, service_env
from messages import plain_message, to_bytes
from syncing import imap_account
from test_embedded import mint, processes_using


def embedded_env(data_dir, dovecot) -> dict:
    return service_env(
        None,
        EMAIL_SERVICE_DATA_DIR=str(data_dir),
        EMAIL_SERVICE_CA_FILE=str(dovecot.ca_file),
        EMAIL_SERVICE_ALLOWED_DESTINATIONS=ALLOWED_DESTINATIONS,
        EMAIL_SERVICE_WORKER_PROCESSES="1",
        EMAIL_SERVICE_RATE_LIMITS="false",
    )


def run_command(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "email_service", *args], env=env, capture_output=True, text=True, timeout=120
    )


def is_worker(process: psutil.Process) -> bool:
    try:
        return "worker" in " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie its parent has not reaped yet
        return False


def workers_of(process: psutil.Process, *, recursive: bool = True) -> list[psutil.Process]:
    return [p for p in process.children(recursive=recursive) if is_worker(p)]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout}s")


def healthy(service: ServiceProcess) -> bool:
    return httpx.get(service.url + "/health", timeout=5).status_code == 200


def test_serve_a_second_worker_migrate_and_rotate_keys_share_one_data_dir(tmp_path, dovecot):
    data_dir = tmp_path / "var"
    env = embedded_env(data_dir, dovecot)
    api = ServiceProcess(env, tmp_path, "--no-embedded-worker")
    worker = None
    try:
        api.wait_healthy()
        # A worker started on its own finds the running servers, and its jobs run with its settings.
        worker = subprocess.Popen(
            [sys.executable, "-m", "email_service", "worker"],
            env=env,
            stdout=(tmp_path / "worker.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        mailbox = dovecot.add_user()
        dovecot.append(mailbox, "INBOX", to_bytes(plain_message("Through the second worker")))
        headers = {"Authorization": f"Bearer {mint(env, uuid.uuid4(), uuid.uuid4())}"}
        created = httpx.post(
            api.url + "/api/accounts", json=imap_account(dovecot, mailbox), headers=headers, timeout=10
        ).json()
        task = httpx.post(f"{api.url}/api/sync/{created['id']}", json={}, headers=headers, timeout=10).json()

        def finished():
            status = httpx.get(f"{api.url}/api/sync/task/{task['taskId']}", headers=headers, timeout=10).json()
            return status if status["status"] in ("success", "failure") else None

        status = wait_for(finished, 60, "the sync did not finish")
        assert status["status"] == "success" and status["result"]["messagesAdded"] == 1, status

        # Leaving stops nothing the others still use.
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        assert healthy(api)
        for command in ("migrate", "rotate-keys"):
            result = run_command(env, command)
            assert result.returncode == 0, result.stderr[-2000:]
            assert healthy(api), f"/health failed after {command}"
        users = json.loads((data_dir / "run" / "users.json").read_text())
        assert users == [api.proc.pid]
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        assert api.stop() == 0, api.log()[-3000:]
    # The last one to leave stops the servers.
    assert processes_using(data_dir) == []


def test_a_killed_serve_takes_its_worker_along_and_the_next_start_cleans_up(tmp_path, dovecot):
    data_dir = tmp_path / "var"
    env = embedded_env(data_dir, dovecot)
    first = ServiceProcess(env, tmp_path)
    first.wait_healthy()
    serve = psutil.Process(first.proc.pid)
    wait_for(lambda: workers_of(serve), 30, "serve started no worker")
    # Everything serve started: the worker pool and its processes, and the watcher.
    tree = serve.children(recursive=True)
    assert any("watch" in " ".join(p.cmdline()) for p in tree), [p.cmdline() for p in tree]

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=20)
    assert alive == [], f"the worker or the watcher outlived the serve that started it: {alive}"

    # The servers were left running; the next start uses them, and a clean stop still stops them.
    second = ServiceProcess(env, tmp_path)
    try:
        second.wait_healthy()
        wait_for(lambda: workers_of(psutil.Process(second.proc.pid)), 30, "serve started no worker")
        users = json.loads((data_dir / "run" / "users.json").read_text())
        assert users == [second.proc.pid], users
    finally:
        assert second.stop() == 0, second.log()[-3000:]
    assert processes_using(data_dir) == [], "a dead command's stale handle kept the servers up"


def test_serve_notices_when_its_worker_dies_and_starts_another(tmp_path, dovecot):
    env = embedded_env(tmp_path / "var", dovecot)
    api = ServiceProcess(env, tmp_path)
    try:
        api.wait_healthy()
        serve = psutil.Process(api.proc.pid)
        [worker] = wait_for(lambda: workers_of(serve, recursive=False), 30, "no worker")
        for process in [worker, *worker.children(recursive=True)]:
            process.send_signal(signal.SIGKILL)
        replacement = wait_for(
            lambda: [w for w in workers_of(serve, recursive=False) if w.pid != worker.pid],
            30,
            "no replacement worker",
        )
        assert len(replacement) == 1
        assert f"the background worker (pid {worker.pid}) exited" in api.log()
        assert healthy(api)
    finally:
        assert api.stop() == 0, api.log()[-3000:]


# A parent killed while it forks: its child asks to die with its parent only after the parent is
# gone. Started as a worker pool starts its processes (multiprocessing) or as `serve` starts its
# worker (a plain fork, the parent's pid handed over).
ORPHANED_CHILD = """
import multiprocessing, os, sys, time
from email_service.queue.worker import die_with_parent

def child(path, parent_pid):
    with open(path, "w") as out:
        out.write(str(os.getpid()))
    time.sleep(1)
    die_with_parent(parent_pid)
    time.sleep(60)

if __name__ == "__main__":
    path, how = sys.argv[1], sys.argv[2]
    if how == "multiprocessing":
        multiprocessing.get_context("fork").Process(target=child, args=(path, None)).start()
    else:
        parent = os.getpid()
        if os.fork() == 0:
            child(path, parent)
    os._exit(0)
"""


@pytest.mark.parametrize("how", ["multiprocessing", "fork"])
def test_a_worker_whose_parent_died_before_it_started_stops_at_once(tmp_path, how):
    pid_file = tmp_path / "child.pid"
    subprocess.run([sys.executable, "-c", ORPHANED_CHILD, str(pid_file), how], check=True, timeout=30)
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 10, "the child never started"))

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    try:
        wait_for(gone, 10, "the orphaned worker did not stop")
    finally:
        if not gone():
            psutil.Process(pid).kill()
