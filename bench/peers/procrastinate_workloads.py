"""procrastinate side of the benchmark (PostgreSQL); runs inside procrastinate's throw-away venv.

    python procrastinate_workloads.py WORKLOAD --url URL [--n N] [--workers K] [--samples S]

Read from its documentation and the installed package: the application opens the App
synchronously and defers with ``task.defer(...)`` (one job, one statement) or
``task.batch_defer(*kwargs)`` (all jobs in one statement); ``--workers K`` is K processes of
procrastinate's own worker (``python -m procrastinate --app=... worker --concurrency=C``), each
running C asynchronous sub-workers (procrastinate_tasks.CONCURRENCY). Jobs are kept after they
succeed (procrastinate's default, ``delete_jobs=never``), like lilota's rows.

procrastinate records every state change of a job in ``procrastinate_events`` with the server's
time: a drain is timed from the first ``started`` event to the last ``succeeded`` one, read
afterwards. It has no wait() and stores no results: the latency workload polls the job's status
every 5 ms (``job_manager.get_job_status``) and its task sends its start time over UDP.
"""

import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common import main, emit, stop_processes, emit_drain, emit_latency, rss_kib, wait_until  # noqa: E402


def _tasks(url):
    os.environ["BENCH_DB_URL"] = url      # the tasks module reads it, in the workers too
    sys.path.insert(0, HERE)
    import procrastinate_tasks
    return procrastinate_tasks


def _version():
    from importlib.metadata import version
    return version("procrastinate")


def _open(url):
    """The tasks module, its App opened (sync) and procrastinate's schema applied: the schema and
    the connections are not part of any figure."""
    tasks = _tasks(url)
    tasks.app.open()
    tasks.app.schema_manager.apply_schema()
    return tasks


def _workers(tasks, k):
    """K procrastinate worker processes, as ``procrastinate worker`` runs them: with its default
    log level, INFO, two lines per job (to /dev/null; a worker that fails is reported by its exit
    code)."""
    env = dict(os.environ, PYTHONPATH=HERE)
    return [subprocess.Popen([sys.executable, "-m", "procrastinate", "--app=procrastinate_tasks.app", "worker",
                              f"--concurrency={tasks.CONCURRENCY}", f"--name=bench-{i}"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(k)]


def _stop(procs):
    stop_processes(procs, signal.SIGTERM)   # graceful: procrastinate's signal handler


def _rows(tasks, sql):
    connector = tasks.app.connector.get_sync_connector()
    with connector.pool.connection() as conn:
        return conn.execute(sql).fetchall()


def _status(tasks, job_id):
    return tasks.app.job_manager.get_job_status(job_id).value


def _check_running(procs):
    """Raise when a worker process has exited (its error is on stderr) rather than wait in vain."""
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"a procrastinate worker exited with code {proc.returncode}")


def _wait_done(tasks, procs, job_id, timeout=600, interval=0.005):
    """Poll the job's status until it succeeded, while the workers ``procs`` run; procrastinate
    has no wait()."""
    def succeeded():
        _check_running(procs)
        return _status(tasks, job_id) == "succeeded"
    wait_until(succeeded, timeout, interval)


def enqueue_one(args):
    tasks = _open(args.url)
    defer = tasks.noop.defer
    t0 = time.perf_counter()
    for i in range(args.n):
        defer(i=i)
    elapsed = time.perf_counter() - t0
    tasks.app.close()
    emit(rate=args.n / elapsed, n=args.n, seconds=elapsed, version=_version())


def enqueue_many(args):
    tasks = _open(args.url)
    inputs = [{"i": i} for i in range(args.n)]
    t0 = time.perf_counter()
    tasks.noop.batch_defer(*inputs)
    elapsed = time.perf_counter() - t0
    tasks.app.close()
    emit(rate=args.n / elapsed, n=args.n, seconds=elapsed, version=_version())


def drain(args):
    tasks = _open(args.url)
    ids = tasks.noop.batch_defer(*[{"i": i} for i in range(args.n)])
    procs = _workers(tasks, args.workers)
    try:
        # Jobs are fetched in id order: the last one deferred is about the last one run.
        _wait_done(tasks, procs, ids[-1], interval=0.05)
        wait_until(lambda: _check_running(procs) or _rows(tasks, "SELECT COUNT(*) FROM procrastinate_jobs "
                                                                 "WHERE status IN ('todo', 'doing')")[0][0] == 0,
                   600, 0.05)
    finally:
        _stop(procs)
    (count, first, last), = _rows(tasks, "SELECT COUNT(*) FILTER (WHERE type = 'succeeded'), "
                                         "MIN(at) FILTER (WHERE type = 'started'), "
                                         "MAX(at) FILTER (WHERE type = 'succeeded') FROM procrastinate_events")
    tasks.app.close()
    emit_drain(count, first.timestamp(), last.timestamp(), args.workers, version=_version(),
               concurrency=tasks.CONCURRENCY)


def latency(args):
    tasks = _open(args.url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(60)
    port = sock.getsockname()[1]
    procs = _workers(tasks, args.workers)
    try:
        def run_one():
            job_id = tasks.stamp.defer(port=port)
            scheduled = time.time()
            _wait_done(tasks, procs, job_id, timeout=60)
            started = float(sock.recv(64))
            return scheduled, started, time.time()

        for _ in range(2):   # warm up: the workers are up, first fetches done
            run_one()
        emit_latency(args.samples, run_one, version=_version(), concurrency=tasks.CONCURRENCY)
    finally:
        _stop(procs)
        sock.close()
        tasks.app.close()


def startup(args):
    """The worker processes' start to the first job done; then the RSS of the idle workers."""
    tasks = _open(args.url)
    t0 = time.perf_counter()
    procs = _workers(tasks, args.workers)
    try:
        _wait_done(tasks, procs, tasks.noop.defer(i=0), timeout=60, interval=0.001)
        startup_s = time.perf_counter() - t0
        time.sleep(1.0)      # idle for a while
        rss = [rss_kib(proc.pid) for proc in procs]
        app_rss = rss_kib(os.getpid())
    finally:
        _stop(procs)
        tasks.app.close()
    emit(startup=startup_s, worker_rss_kib=max(r for r in rss if r), app_rss_kib=app_rss, version=_version(),
         concurrency=tasks.CONCURRENCY)


WORKLOADS = {f.__name__: f for f in (enqueue_one, enqueue_many, drain, latency, startup)}


if __name__ == "__main__":
    main(WORKLOADS, n=2000, workers=2, samples=20)
