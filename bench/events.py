"""Benchmark: 1,000 concurrent event streams on one API process, in one run.

    python bench/events.py [--streams 1000] [--users 200] [--changes 200] [--seed 0]

Starts `email-service serve` on the embedded default (its own PostgreSQL and Redis in a temp
data dir, loopback only), creates users with one account each, then:
  - baseline: one stream open, commits changes and times each from its commit to its event;
    the API process's RSS with no stream open (after that warm-up);
  - load:     opens --streams streams (spread over the users: each change reaches all of its
    user's streams), the process's RSS and threads with all of them open, then commits
    --changes changes and times every delivery;
and prints latency p50/p99 for both, RSS with 0 and N streams, and the ratios. Every loop is
bounded in count and in time. Targets: p99 < 1 s with 1,000 streams; no thread per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import httpx  # noqa: E402
import psutil  # noqa: E402
from helpers import ServiceProcess, account_body, service_env  # noqa: E402
from httpx_sse import aconnect_sse  # noqa: E402

from email_service import embedded  # noqa: E402
from email_service.api.auth import TokenVerifier  # noqa: E402
from email_service.changes.log import Entry, record  # noqa: E402
from email_service.config import load_settings  # noqa: E402
from email_service.models import ChangeEntity, ChangeKind  # noqa: E402
from email_service.runtime import Runtime  # noqa: E402
from email_service.services.accounts import create_account  # noqa: E402
from email_service.tenancy import Principal  # noqa: E402

OPEN_BATCH = 50
OPEN_TIMEOUT = 180.0
DELIVERY_TIMEOUT = 60.0


class Bench:
    def __init__(self, url: str, runtime: Runtime, users: list[tuple[Principal, str, str]]) -> None:
        self.url = url
        self.runtime = runtime
        self.users = users  # (principal, token, account id)
        self.committed: dict[str, float] = {}
        self.arrivals: dict[tuple[int, str], float] = {}
        self.ready: set[int] = set()
        self.failed: list[str] = []

    def commit(self, user: int, entity_id: str) -> None:
        principal, _token, account = self.users[user]
        with self.runtime.db.tenant_session(principal) as session:
            record(session, principal, account, [Entry(ChangeEntity.MESSAGE, entity_id, ChangeKind.CREATED, "inbox")])
        self.committed[entity_id] = time.monotonic()

    async def stream(self, client: httpx.AsyncClient, index: int, user: int) -> None:
        headers = {"Authorization": f"Bearer {self.users[user][1]}"}
        try:
            async with aconnect_sse(client, "GET", self.url + "/api/events", headers=headers) as source:
                if source.response.status_code != 200:
                    self.failed.append(f"stream {index}: HTTP {source.response.status_code}")
                    return
                async for event in source.aiter_sse():
                    if event.event == "ready":
                        self.ready.add(index)
                    else:
                        self.arrivals[(index, event.json()["id"])] = time.monotonic()
        except (httpx.HTTPError, ValueError) as exc:
            self.failed.append(f"stream {index}: {type(exc).__name__}: {exc}")

    async def open_streams(self, client: httpx.AsyncClient, owners: list[int]) -> list[asyncio.Task]:
        tasks: list[asyncio.Task] = []
        deadline = time.monotonic() + OPEN_TIMEOUT
        for start in range(0, len(owners), OPEN_BATCH):
            for offset, user in enumerate(owners[start : start + OPEN_BATCH]):
                tasks.append(asyncio.create_task(self.stream(client, start + offset, user)))
            # Open in batches: a thousand simultaneous handshakes measure the accept queue, not streams.
            while len(self.ready) < len(tasks) and time.monotonic() < deadline and not self.failed:
                await asyncio.sleep(0.05)
        if len(self.ready) < len(owners):
            raise SystemExit(f"only {len(self.ready)} of {len(owners)} streams opened: {self.failed[:5]}")
        return tasks

    async def deliveries(self, changes: list[tuple[int, str]], owners: list[int], pause: float) -> list[float]:
        """Commit each change, then wait for it on every stream of its user; the latencies."""
        for user, entity_id in changes:
            await asyncio.to_thread(self.commit, user, entity_id)
            await asyncio.sleep(pause)
        expected = [(index, entity_id) for user, entity_id in changes for index, o in enumerate(owners) if o == user]
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while time.monotonic() < deadline and any(key not in self.arrivals for key in expected):
            await asyncio.sleep(0.05)
        missing = [key for key in expected if key not in self.arrivals]
        if missing:
            raise SystemExit(f"{len(missing)} of {len(expected)} deliveries missing after {DELIVERY_TIMEOUT}s")
        return [self.arrivals[key] - self.committed[key[1]] for key in expected]


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def run(args: argparse.Namespace, service: ServiceProcess, runtime: Runtime, verifier: TokenVerifier) -> None:
    rng = random.Random(args.seed)
    users = []
    for _ in range(args.users):
        principal = Principal(uuid.uuid4(), uuid.uuid4())
        account = create_account(runtime.db, runtime.cipher, principal, account_body())
        users.append((principal, verifier.issue(principal.tenant_id, principal.user_id, 3600, time.time()), account.id))
    pid = service.proc.pid
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(30.0, read=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        # Baseline: one stream (this also warms the process: imports, the hub, its pool).
        bench = Bench(service.url, runtime, users)
        tasks = await bench.open_streams(client, [0])
        base_changes = [(0, f"base-{n}") for n in range(args.baseline_changes)]
        base_latency = await bench.deliveries(base_changes, [0], pause=0.02)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(2)
        rss_0, threads_0 = rss(pid), psutil.Process(pid).num_threads()

        owners = [n % args.users for n in range(args.streams)]
        bench = Bench(service.url, runtime, users)
        started = time.monotonic()
        tasks = await bench.open_streams(client, owners)
        open_seconds = time.monotonic() - started
        await asyncio.sleep(2)
        rss_n, threads_n = rss(pid), psutil.Process(pid).num_threads()
        changes = [(rng.randrange(args.users), f"load-{n}") for n in range(args.changes)]
        load_latency = await bench.deliveries(changes, owners, pause=0.02)
        still_open = sum(1 for task in tasks if not task.done())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    mib = 1024 * 1024
    print(f"streams: {args.streams} open in {open_seconds:.1f}s over {args.users} users; {still_open} still open")
    print(f"latency, 1 stream     ({len(base_latency)} deliveries): ", end="")
    print(f"p50 {percentile(base_latency, 50) * 1000:.1f} ms, p99 {percentile(base_latency, 99) * 1000:.1f} ms")
    print(f"latency, {args.streams} streams ({len(load_latency)} deliveries): ", end="")
    print(f"p50 {percentile(load_latency, 50) * 1000:.1f} ms, p99 {percentile(load_latency, 99) * 1000:.1f} ms")
    print(
        f"latency ratio (load / 1 stream): p50 {percentile(load_latency, 50) / percentile(base_latency, 50):.2f}x, "
        f"p99 {percentile(load_latency, 99) / percentile(base_latency, 99):.2f}x; "
        f"mean {statistics.mean(load_latency) * 1000:.1f} ms"
    )
    print(f"API process RSS: 0 streams {rss_0 / mib:.1f} MiB, {args.streams} streams {rss_n / mib:.1f} MiB")
    print(
        f"  ratio {rss_n / rss_0:.2f}x; {(rss_n - rss_0) / args.streams / 1024:.1f} KiB per stream; "
        f"threads {threads_0} -> {threads_n}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--baseline-changes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (1 <= args.users <= args.streams <= 5000 and 1 <= args.changes <= 5000):
        parser.error("need 1 <= users <= streams <= 5000 and 1 <= changes <= 5000")

    # Each stream is a socket at both ends; the default soft limit (1,024 here) is too low.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4 * args.streams + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        workdir = Path(tmp)
        data_dir = workdir / "var"
        env = service_env(None, EMAIL_SERVICE_DATA_DIR=str(data_dir), EMAIL_SERVICE_LOG_LEVEL="WARNING")
        service = ServiceProcess(env, workdir, "--no-embedded-worker")
        try:
            service.wait_healthy()
            # The same data dir: this process attaches to the servers `serve` started.
            settings = load_settings(env)
            with embedded.services(settings) as resolved:
                runtime = Runtime.build(resolved)
                try:
                    asyncio.run(run(args, service, runtime, TokenVerifier.from_settings(resolved)))
                finally:
                    runtime.close()
        finally:
            code = service.stop()
            if code not in (0, None):
                print(f"serve exited with {code}; its log:\n{service.log()[-3000:]}", file=sys.stderr)


if __name__ == "__main__":
    main()
