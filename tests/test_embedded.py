"""The embedded default: `email-service serve` with no configuration at all, stopped and started again."""

from __future__ import annotations

import stat
import subprocess
import sys
import uuid

import httpx
import psutil
from helpers import ServiceProcess, account_body, service_env


def embedded_env(data_dir) -> dict:
    return service_env(None, EMAIL_SERVICE_DATA_DIR=str(data_dir))


def mint(env, tenant, user) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "email_service", "token", "--tenant-id", str(tenant), "--user-id", str(user)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def processes_using(path) -> list[psutil.Process]:
    """Processes started for this data directory: postgres names it, redis-server runs in it."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        places = [*(process.info["cmdline"] or []), process.info["cwd"] or ""]
        if any(str(path) in place for place in places):
            found.append(process)
    return found


def test_serves_with_no_configuration_and_keeps_its_data_across_restarts(tmp_path):
    data_dir = tmp_path / "var"
    env = embedded_env(data_dir)
    tenant, user = uuid.uuid4(), uuid.uuid4()

    first = ServiceProcess(env, tmp_path)
    try:
        first.wait_healthy()
        headers = {"Authorization": f"Bearer {mint(env, tenant, user)}"}
        created = httpx.post(first.url + "/api/accounts", json=account_body(), headers=headers, timeout=10)
        assert created.status_code == 201, created.text
        assert "Listening on" in first.log() or "listening on" in first.log()
        names = {p.name() for p in processes_using(data_dir)}
        assert "redis-server" in names and "postgres" in names, names
    finally:
        assert first.stop() == 0, first.log()
    assert processes_using(data_dir) == [], "embedded servers or the worker outlived the service"
    secrets_file = data_dir / "secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600

    second = ServiceProcess(env, tmp_path)
    try:
        second.wait_healthy()
        listed = httpx.get(second.url + "/api/accounts", headers=headers, timeout=10)
        assert listed.status_code == 200
        assert [a["id"] for a in listed.json()["accounts"]] == [created.json()["id"]]
    finally:
        assert second.stop() == 0, second.log()
    assert processes_using(data_dir) == []


def test_the_data_directory_is_its_owners_alone(tmp_path):
    data_dir = tmp_path / "var"
    env = embedded_env(data_dir)
    service = ServiceProcess(env, tmp_path)
    try:
        service.wait_healthy()
        headers = {"Authorization": f"Bearer {mint(env, uuid.uuid4(), uuid.uuid4())}"}
        account = httpx.post(service.url + "/api/accounts", json=account_body(), headers=headers, timeout=10).json()
        upload = httpx.post(
            f"{service.url}/api/{account['id']}/attachments", files={"file": ("a.txt", b"secret")}, headers=headers
        )
        assert upload.status_code == 201, upload.text
        # Others may at most pass through the directory (PostgreSQL's own user must reach its data).
        assert stat.S_IMODE(data_dir.stat().st_mode) & 0o066 == 0
        checked = 0
        for path in data_dir.rglob("*"):
            if path.is_relative_to(data_dir / "postgres") or path.is_socket():
                continue  # PostgreSQL keeps its own 0700; sockets are guarded by their directory
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is open to others"
            checked += 1
        names = {p.name for p in data_dir.rglob("*")}
        assert {"secrets.json", "users.json", "appendonly.aof", "redis.conf"} <= names and checked > 8, names
        assert any(p.parent.name == "uploads" or "uploads" in p.parts for p in (data_dir / "objects").rglob("*"))
    finally:
        assert service.stop() == 0, service.log()
