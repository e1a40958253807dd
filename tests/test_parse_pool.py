"""ParsePool: the same results as parsing in-process, and no worker left behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import psutil
import pytest
from messages import malformed_message, realistic_mix

from email_service.mail import parse_pool
from email_service.mail.parse import parse_message
from email_service.mail.parse_pool import ParsePool


@pytest.fixture(scope="module")
def mail() -> list[bytes]:
    return [*realistic_mix(60, seed=4), malformed_message(), b"", b"not a message"]


def children() -> set[int]:
    # This process's own children: a parse pool's workers are forked from it. Their descendants
    # are not counted: the session's worker process forks job horses of its own at any time.
    return {child.pid for child in psutil.Process().children()}


def wait_gone(pids: set[int], timeout: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = {pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"}
        if not alive:
            return set()
        time.sleep(0.05)
    return alive


def test_results_equal_the_sequential_parse_in_order(mail):
    expected = [parse_message(raw) for raw in mail]
    before = children()
    with ParsePool(2) as pool:
        jobs = [pool.parse(mail[:25]), pool.parse(mail[25:]), pool.parse([])]
        assert [parsed for job in jobs for parsed in job.result()] == expected
        workers = children() - before
        assert len(workers) == 2
    assert wait_gone(workers) == set()
    assert children() - before == set()


def test_close_stops_the_workers_even_with_work_outstanding(mail):
    before = children()
    pool = ParsePool(2)
    job = pool.parse(mail * 3)
    workers = children() - before
    pool.close()
    pool.close()  # harmless the second time
    assert wait_gone(workers) == set()
    # What the pool did not finish is parsed here instead: the results are complete all the same.
    assert job.result() == [parse_message(raw) for raw in mail * 3]


def test_a_killed_worker_falls_back_to_parsing_here(mail):
    before = children()
    with ParsePool(2) as pool:
        assert pool.parse(mail[:2]).result() == [parse_message(raw) for raw in mail[:2]]
        workers = children() - before
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        assert wait_gone(workers) == set()
        assert pool.parse(mail).result() == [parse_message(raw) for raw in mail]
    assert children() - before == set()


def test_workers_die_with_their_parent():
    """A job killed outright (SIGKILL, OOM) must not leave its parse workers waiting forever."""
    ready = multiprocessing.get_context("fork").Queue()

    def job() -> None:
        pool = ParsePool(2)
        pool.parse([b"From: a@example.com\r\n\r\nhi"]).result()
        ready.put([child.pid for child in psutil.Process().children()])
        time.sleep(60)

    parent = multiprocessing.get_context("fork").Process(target=job)
    parent.start()
    workers = set(ready.get(timeout=30))
    assert len(workers) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.join()
    assert wait_gone(workers) == set()


def test_chunks_keep_order_and_bound_size():
    raws = [b"x" * 10] * 40 + [b"y" * (parse_pool.CHUNK_BYTES + 5)] + [b"z"] * 3
    chunks = parse_pool._chunks(raws)
    assert [raw for chunk in chunks for raw in chunk] == raws
    assert all(len(chunk) <= parse_pool.CHUNK_MESSAGES for chunk in chunks)
    assert all(len(chunk) == 1 or sum(map(len, chunk)) <= parse_pool.CHUNK_BYTES for chunk in chunks)


def test_no_pool_on_a_single_core(monkeypatch):
    monkeypatch.setattr(parse_pool, "usable_cores", lambda: 1)
    assert ParsePool.start() is None
    pool = ParsePool.start(workers=2)
    assert pool is not None
    pool.close()
