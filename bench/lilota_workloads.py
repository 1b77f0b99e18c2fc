"""lilota's side of the benchmark: one repetition of one workload per process.

    python bench/lilota_workloads.py WORKLOAD --url URL [--n N] [--workers K] ...

prints one JSON line (see common.emit). Run by bench/run.py; each run gets a fresh database.
Times of claims and completions are read from the task rows afterwards (start_date_time,
end_date_time), so that measuring adds no work to the workers while they run.
"""

import gc
import os
import sys
import time

# BENCH_LILOTA_PATH: the directory of another lilota.py to measure (run.py --baseline).
sys.path.insert(0, os.environ.get("BENCH_LILOTA_PATH") or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

from lilota import Lilota, NodeType, NodeStatus  # noqa: E402

from common import main, emit, emit_drain, emit_latency, rss_kib, db_bytes, wait_until  # noqa: E402

TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lilota_tasks.py")


class Raw:
    """A separate connection for the measurements, through the dialect's documented interface."""

    def __init__(self, app):
        self.dialect = app.storage.dialect
        self.conn = self.dialect.connect()

    def rows(self, sql, params=()):
        # Dialect connections have sqlite3's shape: execute() returns the cursor.
        cur = self.conn.execute(self.dialect.sql(sql), params)
        try:
            return cur.fetchall()
        finally:
            cur.close()

    def window(self, since=None, queue=None):
        """(completed count, first claim, last completion) in epoch seconds; ``since``: only the
        tasks claimed from then on; ``queue``: only that queue's."""
        d = self.dialect
        sql = ("SELECT COUNT(*), MIN(start_date_time), MAX(end_date_time) FROM lilota_task "
               "WHERE status = 'completed'")
        params = ()
        if since is not None:
            sql += f" AND start_date_time >= {d.time_param}"
            params = (d.encode_time(since),)
        if queue is not None:
            sql += " AND queue = ?"
            params += (queue,)
        count, first, last = self.rows(sql, params)[0]
        return count, d.decode_time(first).timestamp(), d.decode_time(last).timestamp()

    def unfinished(self):
        return self.rows("SELECT COUNT(*) FROM lilota_task WHERE status IN ('scheduled', 'running')")[0][0]

    def close(self):
        self.conn.close()


def _worker_pids(app):
    return [n.pid for n in app.get_all_nodes()
            if n.type == NodeType.WORKER and n.status == NodeStatus.RUNNING and n.pid]


def _wait_workers_ready(app, k, timeout=60):
    wait_until(lambda: len(_worker_pids(app)) >= k, timeout)


def enqueue_one(args):
    app = Lilota.scheduler(args.url)
    app.storage.ensure_ready()          # connection and schema are not part of the figure
    inputs = [{"i": i} for i in range(args.n)]
    schedule = app.schedule
    t0 = time.perf_counter()
    for value in inputs:
        schedule("noop", value)
    elapsed = time.perf_counter() - t0
    emit(rate=args.n / elapsed, n=args.n, seconds=elapsed)


def enqueue_many(args):
    """schedule_many() of n inputs; also the process's peak RSS, and by how much it grew during the
    call (the ids it returns, and what it holds while it runs)."""
    import resource   # here: see common.py on what the workload scripts import at the top
    app = Lilota.scheduler(args.url)
    app.storage.ensure_ready()
    inputs = [{"i": i} for i in range(args.n)]
    gc.collect()
    before = rss_kib(os.getpid())
    t0 = time.perf_counter()
    app.schedule_many("noop", inputs)
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    emit(rate=args.n / elapsed, n=args.n, seconds=elapsed, rss_before_kib=before, peak_rss_kib=peak,
         growth_bytes_per_task=max(peak - before, 0) * 1024 / args.n)


def _drain(app, raw, ids, timeout):
    """Wait for the queue to empty: wait() on the last task stored, then the stragglers."""
    app.wait(ids[-1], timeout=timeout)
    wait_until(lambda: raw.unfinished() == 0, timeout)


def _run_queued(app, ids, queue=None):
    """Start the workers, wait until the queued tasks ``ids`` are done, stop; (completed count,
    first claim, last completion) of ``queue``'s tasks (None: all) and the Raw connection, open."""
    raw = Raw(app)
    app.start()
    try:
        _drain(app, raw, ids, timeout=600)
    finally:
        app.stop()
    return raw.window(queue=queue), raw


def drain(args, task="noop", ideal_task_seconds=None):
    app = Lilota(args.url, script_path=TASKS, number_of_workers=args.workers, stop_timeout=60)
    ids = app.schedule_many(task, [{"i": i} for i in range(args.n)])
    (count, first, last), raw = _run_queued(app, ids)
    raw.close()
    emit_drain(count, first, last, args.workers, ideal_task_seconds)


def queues_alone(args):
    """A queue limited to one running task, drained by one worker that serves it alone: the most
    that limit lets through."""
    app = Lilota(args.url, script_path=TASKS, number_of_workers=1, stop_timeout=60, queues=["limited"])
    app.set_queue_limit("limited", concurrency=1)
    ids = app.schedule_many("noop", [{"i": i} for i in range(args.n)], queue="limited")
    (count, first, last), raw = _run_queued(app, ids, queue="limited")
    raw.close()
    emit_drain(count, first, last, 1)


def _two_queues(app, n):
    """n tasks in "limited" (concurrency 1) and in "free" (no limit), drained by ``app``'s two
    workers: the rate of each queue, from its first claim to its last completion."""
    app.set_queue_limit("limited", concurrency=1)
    limited = app.schedule_many("noop", [{"i": i} for i in range(n)], queue="limited")
    free = app.schedule_many("noop", [{"i": i} for i in range(n)], queue="free")
    (count, first, last), raw = _run_queued(app, limited + free, queue="limited")
    free_count, free_first, free_last = raw.window(queue="free")
    raw.close()
    emit_drain(count, first, last, 2, free_rate=free_count / (free_last - free_first))


def queues_two(args):
    """Two workers that both serve "limited" and "free" (_two_queues)."""
    _two_queues(Lilota(args.url, script_path=TASKS, number_of_workers=2, stop_timeout=60,
                       queues=["limited", "free"]), args.n)


def queues_split(args):
    """The same two queues, each served by a worker of its own (queues={"limited": 1, "free": 1}):
    the limited queue's rate when no worker of the free queue ever looks at it."""
    _two_queues(Lilota(args.url, script_path=TASKS, stop_timeout=60, queues={"limited": 1, "free": 1}), args.n)


def _apart_url(url):
    """A second database beside ``url``'s, for an application that shares the machine but not the
    database: a sibling SQLite file, or a schema of its own on the same PostgreSQL server."""
    if url.startswith("sqlite"):
        return url + "-apart"
    return url + ("&" if "?" in url else "?") + "schema=lilota_apart"


def queues_apart(args):
    """The limited queue drained by one worker serving it alone (queues_alone), while a second
    application's worker drains a free queue in a database of its own: what the machine leaves the
    limited queue beside one busy worker, with no database shared between the two."""
    app = Lilota(args.url, script_path=TASKS, number_of_workers=1, stop_timeout=60, queues=["limited"])
    app.set_queue_limit("limited", concurrency=1)
    ids = app.schedule_many("noop", [{"i": i} for i in range(args.n)], queue="limited")
    other = Lilota(_apart_url(args.url), script_path=TASKS, number_of_workers=1, stop_timeout=60, queues=["free"])
    # Twice as many: the free queue keeps its worker busy for the whole of the limited queue's drain.
    other.schedule_many("noop", [{"i": i} for i in range(2 * args.n)], queue="free")
    other.start()
    try:
        (count, first, last), raw = _run_queued(app, ids, queue="limited")
        raw.close()
        other_raw = Raw(other)
        free_count, free_first, free_last = other_raw.window()
        other_raw.close()
    finally:
        other.stop()
    emit_drain(count, first, last, 1, free_rate=free_count / (free_last - free_first))


def steps(args):
    """Tasks of ``--depth`` durable steps each (ctx.step, a small result per step), ``--workers``
    workers: steps/s from the first claim to the last completion (and the tasks/s)."""
    app = Lilota(args.url, script_path=TASKS, number_of_workers=args.workers, stop_timeout=60)
    ids = app.schedule_many("steps", [{"steps": args.depth}] * args.n)
    (count, first, last), raw = _run_queued(app, ids)
    stored = raw.rows("SELECT COUNT(*) FROM lilota_step")[0][0]
    raw.close()
    emit(rate=stored / (last - first), task_rate=count / (last - first), n=count, steps=stored,
         workers=args.workers, seconds=last - first)


def mixed(args):
    drain(args, task="cpu10", ideal_task_seconds=0.010)


def latency(args):
    app = Lilota(args.url, script_path=TASKS, number_of_workers=args.workers)
    app.start()
    try:
        _wait_workers_ready(app, args.workers)
        for _ in range(2):   # warm up: first claims, imports
            app.wait(app.schedule("stamp"), timeout=60)

        def run_one():
            task_id = app.schedule("stamp")
            scheduled = time.time()
            task = app.wait(task_id, timeout=60)
            # end_date_time: stamped by the worker just before the commit that ends the task
            return scheduled, task.output["t"], time.time(), task.end_date_time.timestamp()

        emit_latency(args.samples, run_one)
    finally:
        app.stop()


def startup(args):
    """Lilota.start() to the first completed task; then the RSS of the idle workers."""
    app = Lilota(args.url, script_path=TASKS, number_of_workers=args.workers)
    app.storage.ensure_ready()
    t0 = time.perf_counter()
    app.start()
    try:
        app.wait(app.schedule("noop"), timeout=60)
        startup_s = time.perf_counter() - t0
        _wait_workers_ready(app, args.workers)
        time.sleep(1.0)      # idle for a while
        rss = [rss_kib(pid) for pid in _worker_pids(app)]
        app_rss = rss_kib(os.getpid())
    finally:
        app.stop()
    emit(startup=startup_s, worker_rss_kib=max(r for r in rss if r), app_rss_kib=app_rss)


def first_task(args):
    """Lilota.start() to the first task completed, the task scheduled right after start() as the
    README's example does, with ``--workers`` worker processes; with ``--busy N``, N busy-loop
    processes keep the cores busy from before start() until the task is done (other work on the
    machine)."""
    import subprocess   # here, not at the top: see common's docstring
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        app = Lilota(args.url, script_path=TASKS, number_of_workers=args.workers)
        app.storage.ensure_ready()      # the schema exists, as in an application's second run
        if spinners:
            time.sleep(0.3)             # the spinners are running, not starting
        t0 = time.perf_counter()
        app.start()
        try:
            app.wait(app.schedule("noop"), timeout=60)
            elapsed = time.perf_counter() - t0
        finally:
            for spinner in spinners:
                spinner.kill()
            app.stop()
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    emit(startup=elapsed, workers=args.workers, busy=args.busy)


def footprint(args):
    """Schedule N tasks one by one while the workers run them; RSS and database size afterwards."""
    app = Lilota(args.url, script_path=TASKS, number_of_workers=args.workers, stop_timeout=60)
    app.start()
    try:
        _wait_workers_ready(app, args.workers)
        gc.collect()
        app_before = rss_kib(os.getpid())
        last = None
        for i in range(args.n):
            last = app.schedule("noop", {"i": i})
        raw = Raw(app)
        _drain(app, raw, [last], timeout=600)
        raw.close()
        time.sleep(0.5)
        gc.collect()
        app_after = rss_kib(os.getpid())
        workers_after = [rss_kib(pid) for pid in _worker_pids(app)]
    finally:
        app.stop()
    size = db_bytes(args.url) if args.url.startswith("sqlite") else None
    emit(n=args.n, app_rss_before_kib=app_before, app_rss_after_kib=app_after,
         worker_rss_after_kib=max(r for r in workers_after if r),
         db_bytes=size, bytes_per_task=None if size is None else size / args.n)


def scale(args):
    """Queue ``depth`` tasks (bulk), then measure the drain of the first ``n`` of them, counting
    only the claims made once every worker is running: the same number of tasks, drained by the
    same number of workers, at every depth."""
    app = Lilota(args.url, script_path=TASKS, number_of_workers=args.workers, stop_timeout=60)
    app.storage.ensure_ready()
    chunk = 100_000
    marker = None
    t0 = time.perf_counter()
    for start in range(0, args.depth, chunk):
        ids = app.schedule_many("noop", [None] * min(chunk, args.depth - start))
        if marker is None:
            marker = ids[min(args.n, len(ids)) - 1]
    fill = time.perf_counter() - t0
    raw = Raw(app)
    app.start()
    try:
        _wait_workers_ready(app, args.workers)
        ready = time.time()
        app.wait(marker, timeout=600)      # tasks are claimed in the order they were stored
    finally:
        app.stop()
    count, first, last = raw.window(since=ready)
    raw.close()
    emit(rate=count / (last - first), n=count, depth=args.depth, fill_rate=args.depth / fill, workers=args.workers)


def _table_bytes(raw):
    """{"table": bytes, index name: bytes, ...} of lilota_task: PostgreSQL's relation sizes (the
    table with its TOAST), SQLite's pages by the dbstat table (its "table" holds the rows)."""
    if raw.dialect.name == "postgresql":
        rows = raw.rows("SELECT 'table', pg_table_size('lilota_task') UNION ALL "
                        "SELECT c.relname, pg_relation_size(c.oid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                        "WHERE i.indrelid = CAST('lilota_task' AS regclass)")
    else:
        rows = raw.rows("SELECT CASE name WHEN 'lilota_task' THEN 'table' ELSE name END, SUM(pgsize) FROM dbstat "
                        "WHERE name = 'lilota_task' OR name IN (SELECT name FROM sqlite_master WHERE type = 'index' "
                        "AND tbl_name = 'lilota_task') GROUP BY name")
    return {name: int(size) for name, size in rows}


def _dead_tuples(raw):
    """(dead tuples, autovacuum runs) of lilota_task on PostgreSQL (the statistics lag a little)."""
    if raw.dialect.name != "postgresql":
        return None, None
    return tuple(raw.rows("SELECT n_dead_tup, autovacuum_count FROM pg_stat_user_tables "
                          "WHERE relid = CAST('lilota_task' AS regclass)")[0])


def drain_deep(args):
    """Queue ``depth`` tasks and drain ALL of them: the rate over the whole drain and in each tenth
    of it (from samples of the queue's length every second), the dead tuples and the table's size
    as it goes (PostgreSQL), then the bytes per task of the table and of each index with the
    finished tasks stored, and what is left after cleanup() deleted them."""
    import threading
    app = Lilota(args.url, script_path=TASKS, number_of_workers=args.workers, stop_timeout=60)
    app.storage.ensure_ready()
    t0 = time.perf_counter()
    last = None
    for start in range(0, args.depth, 100_000):
        last = app.schedule_many("noop", [None] * min(100_000, args.depth - start))[-1]
    fill = time.perf_counter() - t0
    raw = Raw(app)
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            queued = raw.rows("SELECT COUNT(*) FROM lilota_task WHERE status = 'scheduled'")[0][0]
            samples.append((time.time(), args.depth - queued, *_dead_tuples(raw), _table_bytes(raw)["table"]
                            if raw.dialect.name == "postgresql" else None))
            stop.wait(1.0)
    app.start()
    try:
        _wait_workers_ready(app, args.workers)
        ready = time.time()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        app.wait(last, timeout=36_000)
        wait_until(lambda: raw.unfinished() == 0, 600)
        stop.set()
        sampler.join()
    finally:
        app.stop()
    count, first, end = raw.window(since=ready)
    tenths = []
    for i in range(10):
        low, high = args.depth * i / 10, args.depth * (i + 1) / 10
        inside = [(t, done) for t, done, *_ in samples if low <= done <= high]
        if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
            tenths.append((inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]))
    stored = _table_bytes(raw)
    deleted = app.cleanup(older_than=0)["tasks"]
    left = _table_bytes(raw)
    dead = [d for _, _, d, _, _ in samples if d is not None]
    emit(rate=count / (end - first), n=count, depth=args.depth, workers=args.workers, fill_rate=args.depth / fill,
         tenths=tenths, tenth_min=min(tenths) if tenths else None,
         dead_max=max(dead) if dead else None, autovacuums=samples[-1][3] if samples else None,
         table_max=max((b for *_, b in samples if b), default=None),
         bytes_per_task={name: size / args.depth for name, size in stored.items()},
         bytes_per_task_total=sum(stored.values()) / args.depth, deleted=deleted,
         bytes_after_cleanup=sum(left.values()), bytes_after_cleanup_by={name: size for name, size in left.items()})
    raw.close()


WORKLOADS = {f.__name__: f for f in (enqueue_one, enqueue_many, drain, mixed, latency, startup, first_task,
                                        footprint, scale, drain_deep, queues_alone, queues_two, queues_split,
                                        queues_apart, steps)}


if __name__ == "__main__":
    main(WORKLOADS, n=10_000, workers=2, samples=25, depth=10_000, busy=0)
