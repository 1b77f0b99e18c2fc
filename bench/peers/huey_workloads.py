"""huey (SqliteHuey) side of the benchmark; runs inside huey's throw-away virtual environment.

    python huey_workloads.py WORKLOAD --db PATH [--n N] [--workers K] [--samples S]

The consumer runs as a separate process (``consumer`` below) with process workers, as a user
would run ``huey_consumer -k process -w K``. huey keeps no claim or completion times, so a drain
is timed by watching the queue from this process every 5 ms: from the first task taken off the
queue to the queue being empty (the no-op task that was taken last ends microseconds later).
"""

import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common import main, emit, emit_drain, emit_latency, rss_kib, children_of, wait_until  # noqa: E402


def _tasks(db):
    os.environ["BENCH_HUEY_DB"] = db
    sys.path.insert(0, HERE)
    import huey_tasks
    return huey_tasks


def _consumer(db, workers):
    env = dict(os.environ, BENCH_HUEY_DB=db)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "consumer", "--db", db,
                             "--workers", str(workers)], env=env, stderr=subprocess.DEVNULL)


def _stop(proc):
    proc.send_signal(signal.SIGINT)   # graceful
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def consumer(args):
    tasks = _tasks(args.db)
    tasks.huey.create_consumer(workers=args.workers, worker_type="process").run()


def enqueue_one(args):
    tasks = _tasks(args.db)
    tasks.huey.storage.queue_size()    # connection and schema are not part of the figure
    noop = tasks.noop
    t0 = time.perf_counter()
    for i in range(args.n):
        noop(i)
    elapsed = time.perf_counter() - t0
    emit(rate=args.n / elapsed, n=args.n, seconds=elapsed)


def drain(args, task="noop", ideal_task_seconds=None):
    tasks = _tasks(args.db)
    function = getattr(tasks, task)
    for i in range(args.n):
        function(i)
    storage = tasks.huey.storage
    proc = _consumer(args.db, args.workers)
    try:
        while storage.queue_size() >= args.n:
            time.sleep(0.005)
        first = time.time()
        while storage.queue_size() > 0:
            time.sleep(0.005)
        last = time.time()
    finally:
        _stop(proc)
    emit_drain(args.n, first, last, args.workers, ideal_task_seconds)


def mixed(args):
    drain(args, task="cpu10", ideal_task_seconds=0.010)


def latency(args):
    tasks = _tasks(args.db)
    proc = _consumer(args.db, args.workers)
    try:
        for _ in range(2):
            tasks.stamp().get(blocking=True, timeout=60)

        def run_one():
            result = tasks.stamp()
            scheduled = time.time()
            started = result.get(blocking=True, timeout=60)   # huey's own way to wait
            return scheduled, started, time.time()

        emit_latency(args.samples, run_one)
    finally:
        _stop(proc)


def startup(args):
    tasks = _tasks(args.db)
    tasks.huey.storage.queue_size()
    t0 = time.perf_counter()
    proc = _consumer(args.db, args.workers)
    try:
        tasks.stamp().get(blocking=True, timeout=60, backoff=1.0, max_delay=0.005)
        startup_s = time.perf_counter() - t0
        time.sleep(1.0)
        workers = wait_until(lambda: [p for p in children_of(proc.pid)][:args.workers] or None, 10)
        rss = [rss_kib(pid) for pid in workers]
        consumer_rss = rss_kib(proc.pid)
    finally:
        _stop(proc)
    emit(startup=startup_s, worker_rss_kib=max(r for r in rss if r), consumer_rss_kib=consumer_rss,
         app_rss_kib=rss_kib(os.getpid()))


WORKLOADS = {f.__name__: f for f in (consumer, enqueue_one, drain, mixed, latency, startup)}


if __name__ == "__main__":
    main(WORKLOADS, "--db", n=2000, workers=2, samples=25)
