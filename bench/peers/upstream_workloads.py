"""Upstream lilota (the PyPI package) side of the benchmark; runs inside its throw-away venv.

    python upstream_workloads.py WORKLOAD --url URL [--n N] [--workers K] [--samples S]

Its API, read from the installed package: ``Lilota.scheduler(db_url)`` returns a scheduler node
that must be ``start()``-ed before ``schedule(name, input)``; ``Lilota.workers(db_url=...,
script_path=..., number_of_workers=...)`` runs worker processes (subprocesses running the script);
``get_task_by_id(id)`` returns the task with ``status``, ``start_date_time``, ``end_date_time``
and ``output``. There is no bulk schedule and no ``wait()``: waiting is polling get_task_by_id.
Its workers sleep 0.1 s after every task and back off to 5 s when idle, by design.
"""

import logging
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common import main, emit, emit_drain, emit_latency, rss_kib, children_of, wait_until  # noqa: E402

TASKS = os.path.join(HERE, "upstream_tasks.py")


def _lilota(url):
    os.environ["BENCH_DB_URL"] = url      # the worker script reads it
    import lilota
    from lilota.core import Lilota
    logging.getLogger().setLevel(logging.WARNING)
    return lilota, Lilota


def _version():
    from importlib.metadata import version
    return version("lilota")


def _scheduler(Lilota, url):
    scheduler = Lilota.scheduler(db_url=url)
    scheduler.start()
    return scheduler


def _wait_done(getter, task_id, timeout=600, interval=0.005):
    """Poll until the task is finished; upstream has no wait()."""
    def finished():
        task = getter(task_id)
        return task if task is not None and str(task.status) in ("completed", "failed", "expired",
                                                                  "cancelled") else None
    return wait_until(finished, timeout, interval)


def enqueue_one(args):
    _, Lilota = _lilota(args.url)
    scheduler = _scheduler(Lilota, args.url)
    try:
        t0 = time.perf_counter()
        for i in range(args.n):
            scheduler.schedule("noop", {"i": i})
        elapsed = time.perf_counter() - t0
    finally:
        scheduler.stop()
    emit(rate=args.n / elapsed, n=args.n, seconds=elapsed, version=_version())


def drain(args, task="noop", ideal_task_seconds=None):
    _, Lilota = _lilota(args.url)
    scheduler = _scheduler(Lilota, args.url)
    ids = [scheduler.schedule(task, {"i": i}) for i in range(args.n)]
    workers = Lilota.workers(db_url=args.url, script_path=TASKS, number_of_workers=args.workers)
    workers.start()
    try:
        for task_id in ids:
            _wait_done(workers.get_task_by_id, task_id, interval=0.05)
    finally:
        workers.stop()
        scheduler.stop()
    tasks = [workers.get_task_by_id(i) for i in ids]
    first = min(t.start_date_time for t in tasks).timestamp()
    last = max(t.end_date_time for t in tasks).timestamp()
    emit_drain(args.n, first, last, args.workers, ideal_task_seconds, version=_version())


def mixed(args):
    drain(args, task="cpu10", ideal_task_seconds=0.010)


def latency(args):
    _, Lilota = _lilota(args.url)
    app = Lilota(db_url=args.url, script_path=TASKS, number_of_workers=args.workers)
    app.start()
    try:
        for _ in range(2):
            _wait_done(app.get_task_by_id, app.schedule("stamp"))

        def run_one():
            task_id = app.schedule("stamp")
            scheduled = time.time()
            task = _wait_done(app.get_task_by_id, task_id)
            return scheduled, task.output["t"], time.time()

        emit_latency(args.samples, run_one, version=_version())
    finally:
        app.stop()


def startup(args):
    _, Lilota = _lilota(args.url)
    app = Lilota(db_url=args.url, script_path=TASKS, number_of_workers=args.workers)
    t0 = time.perf_counter()
    app.start()
    try:
        _wait_done(app.get_task_by_id, app.schedule("noop"), interval=0.001)
        startup_s = time.perf_counter() - t0
        time.sleep(1.0)
        rss = [rss_kib(pid) for pid in children_of(os.getpid())]
        app_rss = rss_kib(os.getpid())
    finally:
        app.stop()
    emit(startup=startup_s, worker_rss_kib=max(r for r in rss if r), app_rss_kib=app_rss, version=_version())


WORKLOADS = {f.__name__: f for f in (enqueue_one, drain, mixed, latency, startup)}


if __name__ == "__main__":
    main(WORKLOADS, n=50, workers=2, samples=20)
