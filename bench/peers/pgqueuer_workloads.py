"""pgqueuer side of the benchmark (PostgreSQL); runs inside pgqueuer's throw-away venv.

    python pgqueuer_workloads.py WORKLOAD --url URL [--n N] [--workers K] [--samples S]

Read from its documentation and the installed package: the application enqueues through
``Queries`` over an asyncpg connection, ``await queries.enqueue("noop", payload)`` one job at a
time or with lists (``enqueue([...], [...], [...])``: all jobs in one statement); ``--workers K``
is K processes of pgqueuer's own worker (``pgqueuer.run("pgqueuer_tasks:main", batch_size=B)``,
what ``pgq run`` runs), each fetching up to B jobs per dequeue (BENCH_PGQUEUER_BATCH_SIZE; pgqueuer's
default is 10). The schema is installed with ``Queries.install()`` (what ``pgq install`` runs;
durability "durable", pgqueuer's default) and ``optimize_autovacuum()`` (``pgq autovac``, on the
checklist of its performance guide).

pgqueuer deletes a job from its queue table when it completes and logs every step in
``pgqueuer_log`` with the server's time: a drain is timed from the first ``picked`` entry to the
last ``successful`` one, read afterwards. Completions are written in batches (its status buffer
flushes at the batch size, or 0.1 s after the first completion waiting). The latency workload
waits the way pgqueuer documents it, with a ``CompletionWatcher`` (LISTEN/NOTIFY, with its
default 50 ms debounce); its entrypoint sends its start time over UDP, pgqueuer stores no results.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common import main, emit, stop_processes, emit_drain, emit_latency, rss_kib  # noqa: E402

BATCH_SIZE = int(os.environ.get("BENCH_PGQUEUER_BATCH_SIZE", "10"))
# A finished job leaves pgqueuer's queue table (its row goes to pgqueuer_log).
JOB_GONE = "SELECT NOT EXISTS (SELECT 1 FROM pgqueuer WHERE id = $1) AS gone"


def _version():
    from importlib.metadata import version
    return version("pgqueuer")


async def _queries(url):
    """(a new asyncpg connection, pgqueuer's Queries over it), pgqueuer's schema installed: the
    schema and the connection are not part of any figure."""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries
    connection = await asyncpg.connect(url)
    queries = Queries(AsyncpgDriver(connection))
    await queries.install()
    await queries.optimize_autovacuum()
    return connection, queries


def _workers(url, k):
    """K pgqueuer worker processes, each running ``pgqueuer.run()``: what ``pgq run`` runs,
    documented as its programmatic equivalent. (``pgq run`` itself fails in pgqueuer 1.6.0 with
    the typer its requirements install: its --log-level option reaches setup_fancy_logger() as a
    str, "AttributeError: 'str' object has no attribute 'name'".)"""
    env = dict(os.environ, PYTHONPATH=HERE, BENCH_DB_URL=url)
    run = f"import asyncio, pgqueuer; asyncio.run(pgqueuer.run('pgqueuer_tasks:main', batch_size={BATCH_SIZE}))"
    return [subprocess.Popen([sys.executable, "-c", run], env=env, cwd=HERE, stdout=subprocess.DEVNULL)
            for _ in range(k)]


def _stop(procs):
    stop_processes(procs, signal.SIGTERM)   # graceful: pgqueuer's signal handler


async def _poll(predicate, procs, timeout=600, interval=0.05):
    """common.wait_until for a coroutine ``predicate``, while the worker processes ``procs`` run."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        _check_running(procs)
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s")
        await asyncio.sleep(interval)


def _check_running(procs):
    """Raise when a worker process has exited (its error is on stderr) rather than wait in vain."""
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"a pgqueuer worker exited with code {proc.returncode}")


def _payloads(n):
    return [json.dumps({"i": i}).encode() for i in range(n)]


def enqueue_one(args):
    async def run():
        connection, queries = await _queries(args.url)
        payloads = _payloads(args.n)
        enqueue = queries.enqueue
        t0 = time.perf_counter()
        for payload in payloads:
            await enqueue("noop", payload)
        elapsed = time.perf_counter() - t0
        await connection.close()
        return elapsed
    elapsed = asyncio.run(run())
    emit(rate=args.n / elapsed, n=args.n, seconds=elapsed, version=_version())


def enqueue_many(args):
    async def run():
        connection, queries = await _queries(args.url)
        entrypoints, payloads, priorities = ["noop"] * args.n, _payloads(args.n), [0] * args.n
        t0 = time.perf_counter()
        await queries.enqueue(entrypoints, payloads, priorities)
        elapsed = time.perf_counter() - t0
        await connection.close()
        return elapsed
    elapsed = asyncio.run(run())
    emit(rate=args.n / elapsed, n=args.n, seconds=elapsed, version=_version())


def drain(args):
    async def run():
        connection, queries = await _queries(args.url)
        ids = await queries.enqueue(["noop"] * args.n, _payloads(args.n), [0] * args.n)
        fetch = queries.driver.fetch
        procs = _workers(args.url, args.workers)
        try:
            # Jobs are dequeued in id order: the last one enqueued is about the last one run.
            await _poll(lambda: _gone(fetch, JOB_GONE, ids[-1]), procs)
            await _poll(lambda: _gone(fetch, "SELECT NOT EXISTS (SELECT 1 FROM pgqueuer) AS gone"), procs)
        finally:
            _stop(procs)
        row, = await fetch("SELECT COUNT(*) FILTER (WHERE status = 'successful') AS count, "
                           "MIN(created) FILTER (WHERE status = 'picked') AS first, "
                           "MAX(created) FILTER (WHERE status = 'successful') AS last FROM pgqueuer_log")
        await connection.close()
        return row["count"], row["first"].timestamp(), row["last"].timestamp()
    count, first, last = asyncio.run(run())
    emit_drain(count, first, last, args.workers, version=_version(), batch_size=BATCH_SIZE)


async def _gone(fetch, sql, *params):
    """The ``gone`` column of the one row ``sql`` returns."""
    return (await fetch(sql, *params))[0]["gone"]


def latency(args):
    from pgqueuer.core.completion import CompletionWatcher
    loop = asyncio.new_event_loop()
    connection, queries = loop.run_until_complete(_queries(args.url))
    watcher = CompletionWatcher(queries.driver, queries=queries)
    loop.run_until_complete(watcher.__aenter__())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(60)
    port = str(sock.getsockname()[1]).encode()
    procs = _workers(args.url, args.workers)

    async def schedule_and_wait():
        _check_running(procs)
        job_id, = await queries.enqueue("stamp", port)
        scheduled = time.time()
        await asyncio.wait_for(watcher.wait_for(job_id), 60)
        return scheduled

    try:
        def run_one():
            scheduled = loop.run_until_complete(schedule_and_wait())
            finished = time.time()
            return scheduled, float(sock.recv(64)), finished

        for _ in range(2):   # warm up: the workers are up, first dequeues done
            run_one()
        emit_latency(args.samples, run_one, version=_version(), batch_size=BATCH_SIZE)
    finally:
        _stop(procs)
        sock.close()
        loop.run_until_complete(watcher.__aexit__(None, None, None))
        loop.run_until_complete(connection.close())
        loop.close()


def startup(args):
    """The worker processes' start to the first job done; then the RSS of the idle workers."""
    async def run():
        connection, queries = await _queries(args.url)
        t0 = time.perf_counter()
        procs = _workers(args.url, args.workers)
        try:
            job_id, = await queries.enqueue("noop", b"{}")
            await _poll(lambda: _gone(queries.driver.fetch, JOB_GONE, job_id), procs, 60, 0.001)
            startup_s = time.perf_counter() - t0
            await asyncio.sleep(1.0)      # idle for a while
            rss = [rss_kib(proc.pid) for proc in procs]
            app_rss = rss_kib(os.getpid())
        finally:
            _stop(procs)
        await connection.close()
        return startup_s, rss, app_rss
    startup_s, rss, app_rss = asyncio.run(run())
    emit(startup=startup_s, worker_rss_kib=max(r for r in rss if r), app_rss_kib=app_rss, version=_version(),
         batch_size=BATCH_SIZE)


WORKLOADS = {f.__name__: f for f in (enqueue_one, enqueue_many, drain, latency, startup)}


if __name__ == "__main__":
    main(WORKLOADS, n=2000, workers=2, samples=20)
