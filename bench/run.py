"""lilota's benchmark: lilota against the raw database floor and its peers, in one run.

    python bench/run.py                      # the full run, SQLite then PostgreSQL (~35 minutes on a
                                             # slow 2-core machine, and ~20 more for the PostgreSQL
                                             # peers); rewrites the results block of bench/RESULTS.md
    python bench/run.py --quick              # fewer, smaller runs for development (RESULTS.md untouched)
    python bench/run.py --only drain,latency # some workloads only (names: see --help)
    python bench/run.py --backend postgres   # PostgreSQL only (skipped, with the reason, when no server answers)
    python bench/run.py --no-peers           # lilota and the floor only
    python bench/run.py --quick --baseline ../old-checkout   # A/B: this lilota.py against another one
    python bench/run.py --only enqueue,drain --url-options synchronous=FULL   # another durability setting

Every repetition of every workload runs in a new process on a new, empty database. Repetitions
of the systems are interleaved (lilota, floor, the peers, then again), so that noise from the
machine falls on all of them alike; each figure is the median over the repetitions, with the
min-max range, and the ratios compare medians measured in the same run.

The peers are installed by this script into throw-away virtual environments under
bench/.venvs/ (gitignored; delete it, or pass --refresh-peers, to reinstall): on SQLite huey
(SqliteHuey), on PostgreSQL procrastinate and pgqueuer, on this Python; and upstream lilota from
PyPI -- 1.0.0, its last version with ``LilotaWorker.register`` (1.1.0 replaced it with
``@worker.task``), and its newest -- on Python >= 3.12, which upstream lilota requires.
"""

import argparse
import datetime
import glob
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from common import FreshDatabase, postgres_reachable, summary, REPO_ROOT  # noqa: E402

sys.path.insert(0, REPO_ROOT)

VENVS = os.path.join(BENCH, ".venvs")
RESULTS_MD = os.path.join(BENCH, "RESULTS.md")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
UPSTREAM_REGISTER_VERSION = "1.0.0"   # the last upstream release with LilotaWorker.register
# The PostgreSQL queues measured beside lilota's PostgreSQL backend (issue 16): (key, the
# requirements installed in its venv, its package's name, its settings for the workload scripts,
# the settings as the list of systems shows them). Each runs with the driver its documentation
# recommends: procrastinate on psycopg 3 (the binary build, as lilota's venv has it), pgqueuer on
# asyncpg. Why these settings: bench/RESULTS.md, "PostgreSQL peers".
POSTGRES_PEERS = (
    ("procrastinate", "procrastinate psycopg[binary]", "procrastinate", {"BENCH_PROCRASTINATE_CONCURRENCY": "4"},
     "(async tasks, worker --concurrency=4, a pool of 4 connections per worker)"),
    ("pgqueuer", "pgqueuer[asyncpg]", "pgqueuer", {"BENCH_PGQUEUER_BATCH_SIZE": "100"},
     "(async entrypoints, batch_size=100, one asyncpg connection per worker)"),
)


# Workload processes write and use byte-code caches, as an installed package has them (this
# machine sets PYTHONDONTWRITEBYTECODE; compiling lilota.py at every start costs each worker
# about 3 MB and tens of milliseconds).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

# --- systems --------------------------------------------------------------------------------------

class System:
    """One thing measured: how to run a workload script of it with a database URL."""

    def __init__(self, key, label, python, script, db_arg="--url", env=None, postgres_scheme=None, url_options="",
                 detail=""):
        self.key, self.label, self.python, self.script, self.db_arg = key, label, python, script, db_arg
        self.detail = detail                     # shown in the list of systems, not in the table
        self.env = dict(ENV, **(env or {}))
        self.postgres_scheme = postgres_scheme   # e.g. SQLAlchemy's "postgresql+psycopg"
        self.url_options = url_options           # lilota URL options, e.g. "synchronous=FULL"

    def command(self, workload, db, params):
        target = db.path if self.db_arg == "--db" else db.url
        if self.postgres_scheme and target.startswith("postgresql://"):
            target = self.postgres_scheme + target[len("postgresql"):]
        if self.url_options:
            target += "?" + self.url_options
        cmd = [self.python, self.script, workload, self.db_arg, target]
        for name, value in params.items():
            cmd += [f"--{name}", str(value)]
        return cmd


def _find_python_312():
    """A Python >= 3.12 for upstream lilota: on PATH, or one of pyenv's builds."""
    candidates = [shutil.which(f"python3.{m}") for m in (12, 13)]
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for minor in (12, 13):
        candidates += sorted(glob.glob(os.path.join(root, "versions", f"3.{minor}.*", "bin", f"python3.{minor}")))
    for exe in candidates:
        if not exe or not os.access(exe, os.X_OK):
            continue
        try:   # a pyenv shim exists for every version but runs only the selected ones
            done = subprocess.run([exe, "-c", "import sys; print(sys.version_info >= (3, 12))"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.stdout.strip() == "True":
            return exe
    return None


def _venv(name, python, requirement, refresh, log):
    """A throw-away venv under bench/.venvs with ``requirement`` (if any; requirements separated by
    spaces) installed; its python, or None when it cannot be made."""
    path = os.path.join(VENVS, name)
    exe = os.path.join(path, "bin", "python")
    marker = os.path.join(path, ".installed")
    if refresh and os.path.isdir(path):
        shutil.rmtree(path)
    if os.path.exists(marker):
        return exe
    log(f"  creating {os.path.relpath(path, REPO_ROOT)} ({python}){' with ' + requirement if requirement else ''}")
    shutil.rmtree(path, ignore_errors=True)
    try:
        subprocess.run([python, "-m", "venv", path], check=True, capture_output=True, timeout=300)
        if requirement:
            subprocess.run([exe, "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirement.split()],
                           check=True, capture_output=True, text=True, timeout=900)
    except subprocess.CalledProcessError as exc:
        log(f"  could not install {requirement}: {(exc.stderr or '').strip()[-500:]}")
        return None
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"  could not install {requirement}: {exc}")
        return None
    open(marker, "w").close()
    return exe


def _pip_version(python, package):
    done = subprocess.run([python, "-c", f"from importlib.metadata import version; print(version({package!r}))"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "?"


def make_systems(args, log):
    # lilota and the floor run in an empty venv of this Python, like huey: the same interpreter
    # without whatever the base installation imports at start-up (a .pth file can add megabytes
    # to every process, workers included).
    if args.backend == "sqlite":
        base = _venv("base", sys.executable, None, args.refresh_peers, log) or sys.executable
    else:   # lilota's PostgreSQL dialect needs a driver
        base = _venv("base-pg", sys.executable, "psycopg[binary]", args.refresh_peers, log) or sys.executable
    options = args.url_options
    shown = f" ?{options}" if options else ""
    systems = [
        System("lilota", f"lilota (this){shown}", base, os.path.join(BENCH, "lilota_workloads.py"),
               url_options=options),
        System("floor", f"floor (raw SQL loop){shown}", base, os.path.join(BENCH, "floor.py"), url_options=options),
        System("floor1", f"floor, one commit per task{shown}", base, os.path.join(BENCH, "floor.py"),
               url_options=options),
        System("floor_bulk", f"floor, bulk: {'COPY' if args.backend != 'sqlite' else 'multi-row INSERT'}{shown}",
               base, os.path.join(BENCH, "floor.py"), url_options=options),
    ]
    if args.baseline:
        # Another lilota.py, run through the same workloads: an A/B comparison of a change.
        systems.insert(1, System("baseline", f"lilota baseline ({args.baseline}){shown}", base,
                                 os.path.join(BENCH, "lilota_workloads.py"),
                                 env={"BENCH_LILOTA_PATH": os.path.abspath(args.baseline)}, url_options=options))
    skipped = []
    if args.no_peers:
        return systems, ["peers: --no-peers"]
    if args.baseline:
        return systems, ["peers: --baseline compares two lilotas"]
    if args.backend == "sqlite":
        huey = _venv("huey", sys.executable, "huey", args.refresh_peers, log)
        if huey:
            systems.append(System("huey", f"huey {_pip_version(huey, 'huey')} (SqliteHuey)", huey,
                                  os.path.join(BENCH, "peers", "huey_workloads.py"), db_arg="--db"))
        else:
            skipped.append("huey: could not be installed")
        skipped.append("procrastinate, pgqueuer: PostgreSQL only")
    else:
        skipped.append("huey: the peer measured is huey's SQLite storage")
        for key, requirement, package, settings, shown in POSTGRES_PEERS:
            exe = _venv(key, sys.executable, requirement, args.refresh_peers, log)
            if exe is None:
                skipped.append(f"{key}: could not be installed")
                continue
            systems.append(System(key, f"{key} {_pip_version(exe, package)}", exe,
                                  os.path.join(BENCH, "peers", f"{key}_workloads.py"), env=settings, detail=shown))
    py312 = _find_python_312()
    if py312 is None:
        skipped.append("upstream lilota: needs Python >= 3.12 and none was found (PATH, ~/.pyenv/versions)")
    else:
        for name, requirement in ((f"lilota-{UPSTREAM_REGISTER_VERSION}", f"lilota=={UPSTREAM_REGISTER_VERSION}"),
                                  ("lilota-newest", "lilota")):
            exe = _venv(name, py312, requirement, args.refresh_peers, log)
            if exe is None:
                skipped.append(f"upstream {requirement}: could not be installed")
                continue
            version = _pip_version(exe, "lilota")
            python = subprocess.run([exe, "-c", "import platform; print(platform.python_version())"],
                                    capture_output=True, text=True).stdout.strip()
            systems.append(System(f"up-{version}" if name != "lilota-newest" else "up-newest",
                                  f"upstream lilota {version}" + (" (newest)" if name == "lilota-newest" else ""),
                                  exe, os.path.join(BENCH, "peers", "upstream_workloads.py"),
                                  postgres_scheme="postgresql+psycopg", detail=f"on Python {python}"))
    return systems, skipped


# --- workloads ------------------------------------------------------------------------------------

class Case:
    """A workload: per system the script's workload name, its parameters and how often to run it;
    ``rows`` are the figures read from each result: (field, title, unit, higher_is_better)."""

    def __init__(self, key, title, rows, plan, borrow=None):
        self.key, self.title, self.rows, self.plan = key, title, rows, plan
        self.borrow = borrow or {}    # {system key: case key}: show that case's results here too


def make_cases(quick, repetitions=None):
    q = quick
    reps = repetitions or (2 if q else 5)        # cheap workloads
    few = repetitions or (1 if q else 3)         # expensive ones
    up = dict(n=20 if q else 40)   # upstream lilota runs about 9 tasks/s per worker by design
    rate = [("rate", "throughput", "tasks/s", True)]
    cases = [
        Case("enqueue", "enqueue: schedule() one by one", rate, {
            "lilota": ("enqueue_one", dict(n=5000 if q else 20000), reps),
            "floor": ("insert", dict(n=5000 if q else 20000), reps),
            "huey": ("enqueue_one", dict(n=1000 if q else 5000), reps),
            "up": ("enqueue_one", dict(n=200 if q else 500), few),
            "procrastinate": ("enqueue_one", dict(n=5000 if q else 20000), reps),
            "pgqueuer": ("enqueue_one", dict(n=5000 if q else 20000), reps),
        }),
        Case("enqueue_many", "enqueue: schedule_many() in one call", rate, {
            "lilota": ("enqueue_many", dict(n=100_000), reps),
            "floor": ("insert_many", dict(n=100_000), reps),
            "floor_bulk": ("insert_bulk", dict(n=100_000), reps),
            "procrastinate": ("enqueue_many", dict(n=100_000), reps),
            "pgqueuer": ("enqueue_many", dict(n=100_000), reps),
        }),
    ]
    # The bulk path (issue 16) at both ends: its rate against both floors, and the memory of the
    # process -- its peak, and what it grew by during the call per task (the ids returned, ~100
    # bytes each, and one chunk of work; not a copy of every input's row and JSON).
    bulk_rows = rate + [("peak_rss_kib", "peak RSS of the process", "MiB", False),
                        ("rss_before_kib", "RSS before the call (inputs made)", "MiB", False),
                        ("growth_bytes_per_task", "peak RSS growth during the call per task", "bytes", False)]
    for n, label, runs in ((10_000, "10k", reps), (1_000_000, "1m", repetitions or (1 if q else 2))):
        cases.append(Case(f"enqueue_many_{label}", f"enqueue: schedule_many() of {n:,} inputs in one call", bulk_rows, {
            "lilota": ("enqueue_many", dict(n=n), runs),
            "floor": ("insert_many", dict(n=n), runs),
            "floor_bulk": ("insert_bulk", dict(n=n), runs),
        }))
    for k in (1, 2, 4):
        cases.append(Case(f"drain{k}", f"drain: no-op tasks, {k} worker{'s' if k > 1 else ''}", rate, {
            "lilota": ("drain", dict(n=5000 if q else 20000, workers=k), reps),
            "floor": ("claim_complete", dict(n=5000 if q else 20000), reps) if k == 1 else None,
            "floor1": ("claim_complete_one_commit", dict(n=5000 if q else 20000), reps) if k == 1 else None,
            "huey": ("drain", dict(n=2000 if q else 5000, workers=k), reps),
            "up": ("drain", dict(up, workers=k), few),
            # procrastinate drains some hundreds of tasks/s here: a run of 20,000 takes a minute
            "procrastinate": ("drain", dict(n=5000 if q else 20000, workers=k), few),
            "pgqueuer": ("drain", dict(n=5000 if q else 20000, workers=k), reps),
        }, borrow={} if k == 1 else {"floor": "drain1", "floor1": "drain1"}))
    ms = lambda field, title: (field, title, "ms", False)  # noqa: E731
    cases += [
        Case("latency", "latency on an idle system (2 workers, 20 samples per run, idle gaps 0.25-1.25 s)",
             [ms("pickup_p50", "schedule() -> task starts, p50"), ms("pickup_p95", "... p95"),
              ms("pickup_max", "... max"), ms("done_p50", "schedule() -> wait() returns, p50"),
              ms("done_p95", "... p95"), ms("done_max", "... max"),
              ms("woken_p50", "task ended -> wait() returns, p50"), ms("woken_p95", "... p95")], {
            "lilota": ("latency", dict(samples=20), 1 if q else 3),
            "huey": ("latency", dict(samples=20), 1 if q else 2),
            "up": ("latency", dict(samples=20), 1),
            "procrastinate": ("latency", dict(samples=20), 1 if q else 3),
            "pgqueuer": ("latency", dict(samples=20), 1 if q else 3),
        }),
        Case("mixed", "mixed: tasks of 10 ms CPU, 2 workers",
             [("rate", "tasks/s (ideal 200)", "tasks/s", True),
              ("overhead", "wall time per task beyond its 10 ms", "ms", False)], {
            "lilota": ("mixed", dict(n=200 if q else 400, workers=2), reps),
            "huey": ("mixed", dict(n=200 if q else 400, workers=2), reps),
            "up": ("mixed", dict(n=20 if q else 40, workers=2), few),
        }),
        Case("startup", "footprint: start-up and idle memory (2 workers)",
             [("startup", "start() -> first task completed", "ms", False),
              ("worker_rss_kib", "RSS of an idle worker process", "MiB", False),
              ("app_rss_kib", "RSS of the application, idle", "MiB", False)], {
            "lilota": ("startup", dict(workers=2), reps),
            "huey": ("startup", dict(workers=2), reps),
            "up": ("startup", dict(workers=2), few),
            "procrastinate": ("startup", dict(workers=2), reps),
            "pgqueuer": ("startup", dict(workers=2), reps),
        }),
        Case("footprint", f"footprint: {'20,000' if q else '100,000'} tasks scheduled one by one and run (2 workers)",
             [("app_rss_before_kib", "RSS of the application before", "MiB", False),
              ("app_rss_after_kib", "RSS of the application after", "MiB", False),
              ("worker_rss_after_kib", "RSS of a worker after", "MiB", False),
              ("bytes_per_task", "database bytes per finished task", "bytes", False)], {
            "lilota": ("footprint", dict(n=20_000 if q else 100_000, workers=2), 1),
        }),
    ]
    # start() to the first task done, as the README's example meets it: the machine idle, and with
    # every core kept busy by busy-loop processes (other work running). DESIGN.md §6: 8 workers
    # ≤ 1.5× 1 worker.
    cores = os.cpu_count() or 1
    for busy in (0, cores):
        for k in (1, 2, 8):
            load = f", {busy} busy-loop processes" if busy else ", idle machine"
            cases.append(Case(f"start{k}{'_busy' if busy else ''}",
                              f"startup: start() -> first task done, {k} worker{'s' if k > 1 else ''}{load}",
                              [("startup", "start() -> first task completed", "ms", False)], {
                "lilota": ("first_task", dict(workers=k, busy=busy), 3 if q else 7),
            }))
    # Queues (lilota only; a baseline older than queues cannot run them): the limited queue of a
    # two-queue drain against one worker on it alone; the unlimited path is drain2 (--baseline).
    cases += [
        Case("queues_alone", "queues: a queue limited to concurrency 1, one worker serving it alone", rate, {
            "lilota": ("queues_alone", dict(n=2000 if q else 10000), reps), "baseline": None,
        }),
        Case("queues_two", "queues: 2 workers serving a limited queue (concurrency 1) and a free one",
             [("rate", "the limited queue", "tasks/s", True), ("free_rate", "the free queue", "tasks/s", True)], {
            "lilota": ("queues_two", dict(n=2000 if q else 10000), reps), "baseline": None,
        }),
        # Where the limited queue's share goes: workers of its own (nothing looks at the limited
        # queue but its worker), and a busy worker of another application on another database
        # (what the machine's cores leave it, no database shared).
        Case("queues_split", "queues: the same two queues, one worker for each", [
            ("rate", "the limited queue", "tasks/s", True), ("free_rate", "the free queue", "tasks/s", True)], {
            "lilota": ("queues_split", dict(n=2000 if q else 10000), reps), "baseline": None,
        }),
        Case("queues_apart", "queues: the limited queue alone, another app's worker busy on another database", [
            ("rate", "the limited queue", "tasks/s", True), ("free_rate", "the other database's queue", "tasks/s", True)], {
            "lilota": ("queues_apart", dict(n=2000 if q else 10000), reps), "baseline": None,
        }),
    ]
    # Durable steps (lilota only; a baseline older than them cannot run them): tasks of 10 steps,
    # each step a commit of its own; the cost of tasks without steps is drain's (--baseline).
    for k in (1, 2):
        cases.append(Case(f"steps{k}", f"steps: tasks of 10 ctx.step() each, {k} worker{'s' if k > 1 else ''}",
                          [("rate", "steps stored", "steps/s", True), ("task_rate", "tasks", "tasks/s", True)], {
            "lilota": ("steps", dict(n=300 if q else 1000, depth=10, workers=k), reps), "baseline": None,
        }))
    for depth in ((10_000, 100_000) if q else (10_000, 100_000, 1_000_000)):
        measured = 5000 if q else 10_000
        cases.append(Case(f"scale{depth}", f"scale: {depth:,} queued, drain of the first {measured:,} "
                                           f"(claims once both workers run)",
                          rate + [("fill_rate", "fill: schedule_many(), 100k a call", "tasks/s", True)], {
            "lilota": ("scale", dict(depth=depth, n=measured, workers=2), 1 if q else 3),
        }))
    # A whole deep queue drained (issue 16), only when asked for (--only deep): the 1,000,000 take
    # some ten minutes a run on PostgreSQL.
    for depth in ((10_000, 200_000) if q else (10_000, 1_000_000)):
        cases.append(Case(f"deep{depth}", f"deep: {depth:,} queued, ALL drained (2 workers)", rate + [
            ("tenth_min", "slowest tenth of the drain", "tasks/s", True),
            ("dead_max", "dead tuples of lilota_task, most seen", "rows", False),
            ("autovacuums", "autovacuums of lilota_task during the drain", "runs", False),
            ("bytes_per_task_total", "bytes per finished task (table + indexes)", "bytes", False),
            ("bytes_after_cleanup", "bytes left after cleanup() deleted them", "bytes", False)], {
            "lilota": ("drain_deep", dict(depth=depth, workers=2), 1 if q or depth > 100_000 else 3),
        }))
    return cases


WORKLOAD_GROUPS = {
    "enqueue": ("enqueue", "enqueue_many", "enqueue_many_10k", "enqueue_many_1m"),
    "bulk": ("enqueue_many", "enqueue_many_10k", "enqueue_many_1m"), "drain": ("drain1", "drain2", "drain4"), "latency": ("latency",),
    "mixed": ("mixed",), "footprint": ("startup", "footprint"),
    "startup": tuple(f"start{k}{load}" for load in ("", "_busy") for k in (1, 2, 8)), "scale": ("scale10000", "scale100000", "scale1000000"),
    "floor": (), "peers": (), "queues": ("queues_alone", "queues_two", "queues_split", "queues_apart"), "steps": ("steps1", "steps2"),
    "deep": ("deep10000", "deep200000", "deep1000000"),
}
#: Groups a run leaves out unless --only names them (they take long).
ON_REQUEST = ("deep",)


# --- running --------------------------------------------------------------------------------------


def run_one(system, workload, params, backend, timeout, log):
    """One repetition in a new process on a fresh database: the result dict, or None."""
    try:
        with FreshDatabase(backend) as db:
            cmd = system.command(workload, db, params)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                                  env=system.env)
    except subprocess.TimeoutExpired:
        log(f"    {system.key} {workload}: timed out after {timeout}s")
        return None
    except RuntimeError as exc:
        log(f"    {system.key} {workload}: {exc}")
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        log(f"    {system.key} {workload}: failed (exit {done.returncode})\n      " + tail.replace("\n", "\n      "))
        return None
    return json.loads(lines[-1])


def _system_plan(case, system):
    plan = case.plan.get(system.key, case.plan.get("lilota") if system.key == "baseline" else None)
    if plan is None and system.key.startswith("up-"):
        plan = case.plan.get("up")
    return plan


def run_case(case, systems, backend, log):
    """Run every repetition, interleaving the systems; {system key: [result dicts]}."""
    planned = [(s, _system_plan(case, s)) for s in systems]
    planned = [(s, p) for s, p in planned if p is not None]
    results = {s.key: [] for s, _ in planned}
    rounds = max(p[2] for _, p in planned) if planned else 0
    for rep in range(rounds):
        for system, (workload, params, reps) in planned:
            if rep >= reps:
                continue
            t0 = time.monotonic()
            # A repetition may take 15 minutes; the deep queue's million, an hour on a slow machine.
            result = run_one(system, workload, params, backend, timeout=3600 if case.key.startswith("deep") else 900,
                             log=log)
            if result is not None:
                results[system.key].append(result)
                shown = ", ".join(f"{f}={_fmt(result.get(f), u, raw=True)}" for f, _, u, _ in case.rows
                                  if result.get(f) is not None)
                log(f"    {case.key} {system.key} #{rep + 1}: {shown}  ({time.monotonic() - t0:.1f}s)")
    return results


# --- reporting ------------------------------------------------------------------------------------

def _scale(value, unit):
    if value is None:
        return None
    if unit == "ms":
        return value * 1000.0
    if unit == "MiB":
        return value / 1024.0
    return value


def _fmt(value, unit, raw=False):
    if raw:
        value = _scale(value, unit)
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    if unit == "MiB":
        return f"{value:.1f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def build_rows(cases, systems, all_results):
    """Flat table rows: (title, unit, system label, median, min, max, runs, ratio lilota/this)."""
    table = []
    labels = {s.key: s.label for s in systems}
    for case in cases:
        results = all_results.get(case.key)
        if not results:
            continue
        results = dict(results)
        for key, other in case.borrow.items():
            if all_results.get(other, {}).get(key):
                results[key] = all_results[other][key]
        table.append(("section", case.title))
        for field, title, unit, higher in case.rows:
            stats = {}
            for key, runs in results.items():
                values = [_scale(r.get(field), unit) for r in runs if r.get(field) is not None]
                if values:
                    stats[key] = (summary(values), len(values))
            mine = stats.get("lilota", ((None,), 0))[0][0]
            first = True
            for key in [s.key for s in systems]:
                if key not in stats:
                    continue
                (med, lo, hi), count = stats[key]
                ratio = None
                if key != "lilota" and mine and med:
                    ratio = mine / med if higher else med / mine
                table.append(("row", title if first else "", unit + (" ↑" if higher else " ↓"), labels[key],
                              med, lo, hi, count, ratio, unit))
                first = False
    return table


LEGEND = ("lilota ×: how many times better lilota's median is than this system's (throughput: lilota ÷ "
          "this; times and sizes: this ÷ lilota); below 1 lilota is worse. Against the floor it is the "
          "share of the database's own limit that lilota reaches. ↑: higher is better, ↓: lower is better.")


def _fmt_ratio(ratio):
    if ratio is None:
        return ""
    if ratio >= 100:
        return f"{ratio:,.0f}"
    if ratio >= 10:
        return f"{ratio:.0f}"
    return f"{ratio:.2f}"


def render(table, markdown):
    header = ("figure", "unit", "system", "median", "min–max", "runs", "lilota ×")
    lines = []
    if markdown:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 3 + ["---:"] * 4) + "|")
    else:
        widths = (38, 10, 30, 10, 21, 4, 13)
        fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
        lines.append(fmt.format(*header))
        lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for item in table:
        if item[0] == "section":
            lines.append(f"| **{item[1]}** | | | | | | |" if markdown else f"\n{item[1]}")
            continue
        _, title, unit_shown, label, med, lo, hi, count, ratio, unit = item
        cells = (title, unit_shown, label, _fmt(med, unit), f"{_fmt(lo, unit)}–{_fmt(hi, unit)}", str(count),
                 _fmt_ratio(ratio))
        if markdown:
            lines.append("| " + " | ".join(cells) + " |")
        else:
            lines.append(fmt.format(*[c[:w] for c, w in zip(cells, widths)]))
    lines += ["", LEGEND]
    return "\n".join(lines)


def _median(all_results, case, system, field):
    runs = all_results.get(case, {}).get(system, [])
    return summary([r.get(field) for r in runs])[0]


def evaluate_targets(all_results, backend):
    """[(target, figure, verdict)] for the targets of issue 5 / DESIGN.md §6."""
    out = []

    def check(name, value, shown, ok):
        """A target on a figure: its text (``shown(value)``) and whether ``ok(value)``."""
        if value is None:
            out.append((name, "-", "not measured"))
        else:
            out.append((name, shown(value), "met" if ok(value) else "MISSED"))

    def median(case, field="rate"):
        return _median(all_results, case, "lilota", field)

    def share(name, case, reference_case, reference_system, least):
        """A target on lilota's median as a share of a reference measured in the same run."""
        mine, reference = median(case), _median(all_results, reference_case, reference_system, "rate")
        check(name, (mine, reference) if mine and reference else None,
              lambda v: f"{v[0]:,.0f}/s = {v[0] / v[1]:.0%} of {v[1]:,.0f}/s", lambda v: v[0] >= least * v[1])

    share("queues: the limited queue beside a free one ≥ 80 % of one worker on it alone", "queues_two",
          "queues_alone", "lilota", 0.8)
    for case in ("enqueue_many_10k", "enqueue_many", "enqueue_many_1m"):
        # Issue 16: a share of the faster raw bulk insert of the same rows, measured in the same run.
        floors = [(_median(all_results, case, system, "rate"), system) for system in ("floor", "floor_bulk")]
        floors = [(rate, system) for rate, system in floors if rate]
        best = max(floors) if floors else (None, None)
        n = {"enqueue_many_10k": "10,000", "enqueue_many": "100,000", "enqueue_many_1m": "1,000,000"}[case]
        share(f"schedule_many() of {n} ≥ 85 % of the faster raw bulk insert", case, case, best[1] or "floor", 0.85)
    for load, shown in (("", "idle"), ("_busy", "cores busy")):
        one, eight = median(f"start1{load}", "startup"), median(f"start8{load}", "startup")
        check(f"start() -> first task done, 8 workers ≤ 1.5× 1 worker ({shown})",
              (eight, one) if one and eight else None,
              lambda v: f"{v[0] * 1000:.0f} ms vs {v[1] * 1000:.0f} ms = {v[0] / v[1]:.2f}×", lambda v: v[0] <= 1.5 * v[1])
    check("task ended -> wait() returns, p50 ≤ 2 ms (woken by the database)", median("latency", "woken_p50"),
          lambda v: f"{v * 1000:.2f} ms", lambda v: v <= 0.002)
    deep10k, deep1m = median("deep10000"), median("deep1000000")
    check("drain of 1,000,000 queued, all of it, ≥ 90 % of the drain of 10,000", (deep1m, deep10k) if deep10k and deep1m else None,
          lambda v: f"{v[0]:,.0f}/s vs {v[1]:,.0f}/s = {v[0] / v[1]:.0%}", lambda v: v[0] >= 0.9 * v[1])
    if backend != "sqlite":
        check("PostgreSQL: idle pick-up p50 ≤ 10 ms (NOTIFY)", median("latency", "pickup_p50"),
              lambda v: f"{v * 1000:.1f} ms", lambda v: v <= 0.010)
        check("PostgreSQL: drain with 4 workers ≥ 3,000/s", median("drain4"),
              lambda v: f"{v:,.0f}/s", lambda v: v >= 3000)
        return out
    share("drain, 2 workers ≥ 50 % of the floor's claim+complete loop", "drain2", "drain1", "floor", 0.5)
    runs = all_results.get("latency", {}).get("lilota", [])
    check("idle pick-up latency p50 ≤ 5 ms", summary([r["pickup_p50"] for r in runs])[0],
          lambda v: f"{v * 1000:.2f} ms (median of runs)", lambda v: v <= 0.005)
    check("idle pick-up latency max ≤ 50 ms", max(r["pickup_max"] for r in runs) if runs else None,
          lambda v: f"{v * 1000:.1f} ms (max of all samples)", lambda v: v <= 0.050)
    share("schedule() one by one ≥ 60 % of the floor's INSERT loop", "enqueue", "enqueue", "floor", 0.6)
    check("schedule() one by one ≥ 15,000/s (DESIGN.md §6)", median("enqueue"),
          lambda v: f"{v:,.0f}/s", lambda v: v >= 15000)
    check("schedule_many() ≥ 100,000 tasks/s", median("enqueue_many"), lambda v: f"{v:,.0f}/s", lambda v: v >= 100_000)
    check("idle worker RSS ≤ 20 MiB", median("startup", "worker_rss_kib"),
          lambda v: f"{v / 1024:.1f} MiB", lambda v: v <= 20 * 1024)
    r10k, r1m = median("scale10000"), median("scale1000000")
    check("drain rate with 1M queued within 20 % of the rate with 10k", (r1m, r10k) if r10k and r1m else None,
          lambda v: f"{v[0]:,.0f}/s vs {v[1]:,.0f}/s = {v[0] / v[1]:.0%}", lambda v: v[0] >= 0.8 * v[1])
    return out


def machine_info():
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            info["memory"] = f"{int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    info["os"] = f"{platform.system()} {platform.release()}"
    info["python"] = platform.python_version()
    info["sqlite"] = sqlite3.sqlite_version
    try:
        info["git"] = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()
    except OSError:
        pass
    return info


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def write_results(report):
    """Replace the generated block of bench/RESULTS.md (or create the file)."""
    block = f"{BEGIN}\n{report}\n{END}"
    if os.path.exists(RESULTS_MD):
        with open(RESULTS_MD) as f:
            text = f.read()
        if BEGIN in text and END in text:
            text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        else:
            text += "\n" + block + "\n"
    else:
        text = "# lilota benchmark results\n\n" + block + "\n"
    with open(RESULTS_MD, "w") as f:
        f.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and smaller runs (for development)")
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all",
                        help="all (default): SQLite, then PostgreSQL when it can be measured")
    parser.add_argument("--only", default="", help="comma-separated: " + ", ".join(WORKLOAD_GROUPS))
    parser.add_argument("--reps", type=int, default=None, metavar="N",
                        help="repetitions of every workload (default: 2 or 1 with --quick, 5 or 3 without)")
    parser.add_argument("--no-peers", action="store_true", help="measure lilota and the floor only")
    parser.add_argument("--refresh-peers", action="store_true", help="reinstall the peers' virtual environments")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also measure the lilota.py in DIR (e.g. a checkout of the commit before a "
                             "change), interleaved with this one: an A/B comparison (no peers)")
    parser.add_argument("--url-options", default="", metavar="QUERY",
                        help="options appended to lilota's (and the floor's) database URL, e.g. "
                             "synchronous=FULL or synchronous=OFF")
    parser.add_argument("--write", action="store_true", help="rewrite bench/RESULTS.md after a --quick or --only run")
    args = parser.parse_args()

    def log(text):
        print(text, flush=True)

    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(only) - set(WORKLOAD_GROUPS)
    if unknown:
        parser.error(f"unknown workload(s) {sorted(unknown)}; choose from {sorted(WORKLOAD_GROUPS)}")
    backends = ["sqlite", "postgres"] if args.backend == "all" else [args.backend]
    started = datetime.datetime.now(datetime.timezone.utc)
    info = machine_info()
    load_start = loadavg()
    t_start = time.monotonic()
    command = "python bench/run.py " + " ".join(sys.argv[1:])
    log(f"lilota benchmark: {command.strip()}")
    log(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, SQLite {info['sqlite']}; "
        f"load average {load_start}")
    sections, notes = [], []
    for backend in backends:
        if backend == "postgres":
            import lilota
            reason = None
            if "postgresql" not in getattr(lilota, "_DIALECTS", {}):
                reason = "lilota has no PostgreSQL dialect yet (postgresql:// URLs are refused)"
            else:
                reason = postgres_reachable()
            if reason:
                log(f"\nPostgreSQL: skipped: {reason}")
                notes.append(f"PostgreSQL: skipped: {reason}.")
                continue
        log(f"\n=== {backend} ===")
        args.backend = backend
        systems, skipped = make_systems(args, log)
        for text in skipped:
            log(f"  skipped: {text}")
            notes.append(f"{backend}: skipped {text}.")
        cases = make_cases(args.quick, args.reps)
        if only:
            wanted = set()
            for name in only:
                wanted.update(WORKLOAD_GROUPS[name])
            if "floor" in only or "peers" in only:
                keep = {"lilota", "floor", "floor1", "floor_bulk"} if "floor" in only else set()
                if "peers" in only:
                    keep |= {s.key for s in systems if s.key not in ("floor", "floor1", "floor_bulk")}
                systems = [s for s in systems if s.key in keep]
            if wanted:
                cases = [c for c in cases if c.key in wanted]
        else:
            cases = [c for c in cases if not any(c.key in WORKLOAD_GROUPS[g] for g in ON_REQUEST)]
        all_results = {}
        for case in cases:
            log(f"  {case.title}")
            all_results[case.key] = run_case(case, systems, backend, log)
        table = build_rows(cases, systems, all_results)
        targets = evaluate_targets(all_results, backend)
        sections.append((backend, systems, table, targets))
        log("\n" + render(table, markdown=False))
        log("\nTargets:")
        for name, figure, verdict in targets:
            log(f"  {verdict:>12}  {name}: {figure}")

    elapsed = time.monotonic() - t_start
    load_end = loadavg()
    log(f"\nfinished in {elapsed / 60:.1f} min; load average at start {load_start}, at end {load_end}")
    for note in notes:
        log(note)

    report = [f"Run of {started:%Y-%m-%d %H:%M} UTC, commit {info.get('git', '?')}, {elapsed / 60:.1f} min: "
              f"`{command.strip()}`.", "",
              f"Machine: {info['cpu']}, {info['cores']} cores, {info.get('memory', '?')}, {info['os']}; "
              f"Python {info['python']}, SQLite {info['sqlite']}. Load average at start {load_start}, "
              f"at end {load_end}.", ""]
    for backend, systems, table, targets in sections:
        report += [f"### {backend}", "", "Systems: " + "; ".join(s.label + (f" {s.detail}" if s.detail else "")
                                                   for s in systems) + ".", "",
                   render(table, markdown=True), "", "| target | figure | |", "|---|---|---|"]
        report += [f"| {name} | {figure} | {verdict} |" for name, figure, verdict in targets]
        report.append("")
    report += [f"- {note}" for note in notes]
    if args.write or not (args.quick or only or args.baseline or args.url_options):
        write_results("\n".join(report).rstrip())
        log(f"wrote {os.path.relpath(RESULTS_MD, REPO_ROOT)}")


if __name__ == "__main__":
    main()
