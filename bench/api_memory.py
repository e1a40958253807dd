"""Benchmark: the API process's memory, idle and after some requests, for the capacity plan.

    python bench/api_memory.py [--requests 600]

Runs `email-service serve` (no worker, no webhook dispatcher beside it) on a fresh embedded data
directory and reads the serve process's RSS once /health answers, then after 20 account creations
and ``--requests`` sequential `GET /api/accounts`. The request rate it prints is one client's, in
sequence: it is no measure of throughput under concurrency.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-api-"))
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "EMAIL_SERVICE_DATA_DIR": str(base / "var"),
        "EMAIL_SERVICE_RATE_LIMITS": "false",
        "EMAIL_SERVICE_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "email_service"]
    serve = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [*command, "serve", "--port", str(port), "--no-embedded-worker", "--no-embedded-webhooks"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        process = psutil.Process(serve.pid)
        time.sleep(2)
        idle = process.memory_info().rss
        token = subprocess.run(  # noqa: S603
            [*command, "token", "--tenant-id", str(uuid.uuid4()), "--user-id", str(uuid.uuid4())],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
            for i in range(20):
                account = {
                    "accountName": f"A{i}",
                    "emailAddress": f"a{i}@example.com",
                    "protocol": "imap",
                    "hostname": "imap.example.com",
                    "port": 993,
                    "encryption": "tls",
                    "username": f"a{i}",
                    "password": f"password-{i}",
                    "isSyncEnabled": False,
                }
                client.post("/api/accounts", json=account).raise_for_status()
            start = time.perf_counter()
            for _ in range(args.requests):
                client.get("/api/accounts").raise_for_status()
            elapsed = time.perf_counter() - start
        busy = process.memory_info().rss
    finally:
        serve.terminate()
        serve.wait(timeout=60)
        shutil.rmtree(base, ignore_errors=True)
    print(f"API process RSS idle                 {idle / 2**20:6.0f} MB")
    print(f"API process RSS after {args.requests + 20} requests   {busy / 2**20:6.0f} MB")
    each_ms = elapsed / args.requests * 1000
    print(f"GET /api/accounts, one client        {args.requests / elapsed:6.0f} req/s ({each_ms:.1f} ms each)")


if __name__ == "__main__":
    main()
