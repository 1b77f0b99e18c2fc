"""Helpers shared by the benchmark driver and the workload scripts (standard library only).

Every workload script prints exactly one line of JSON on stdout (``emit``); everything else it
has to say goes to stderr. The driver runs each repetition of a workload in a new process, so
that no repetition inherits a warm cache, a connection or memory from the one before.

This module is imported by the benchmark's application scripts, whose top-level imports every
lilota worker process repeats (multiprocessing's spawn imports the parent's main module again in
the child): it imports at the top only what lilota imports anyway, so that the idle worker RSS
measured is lilota's and not the harness's.
"""

import json
import os
import sys
import time
import urllib.parse
import uuid

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)


def emit(**result):
    """Print a workload's result as the one JSON line the driver reads."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def rss_kib(pid):
    """(Also the tests' helper, through tests/support.py.) Resident set size of a process in KiB (VmRSS from /proc), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def children_of(pid):
    """Pids of the direct children of a process (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the command name in parentheses, which may contain spaces.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def stop_processes(procs, sig, timeout=30):
    """Send ``sig`` (the system's graceful stop) to the worker processes ``procs``; kill those
    still running ``timeout`` seconds later."""
    import subprocess
    for proc in procs:
        proc.send_signal(sig)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summary(values):
    """(median, min, max) of a list of numbers, or (None, None, None) when there are none."""
    import statistics
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def percentile(values, p):
    """The p-th percentile (0-100) by linear interpolation between closest ranks."""
    values = sorted(values)
    if not values:
        return None
    k = (len(values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def emit_drain(count, first, last, workers, ideal_task_seconds=None, **extra):
    """Emit a drain's rate: ``count`` tasks from ``first`` claim to ``last`` completion (epoch
    seconds); with ``ideal_task_seconds``, also the wall time each task cost a worker beyond it."""
    result = dict(rate=count / (last - first), n=count, seconds=last - first, workers=workers, **extra)
    if ideal_task_seconds:
        result["overhead"] = (last - first) * workers / count - ideal_task_seconds
    emit(**result)


def emit_latency(samples, run_one, **extra):
    """Take ``samples`` latency samples, each after an idle gap of 0.25-1.25 s (the same seeded
    gaps for every system), and emit their percentiles. ``run_one()`` schedules a task that
    returns its start time and waits for it the system's own way; it returns (the time schedule()
    returned, the time the task started, the time the wait ended), and, where the system stores
    it, the time the task ended: then also how long the wait took to notice the end ("woken")."""
    import random
    rng = random.Random(1)
    pickup, done, woken = [], [], []
    for _ in range(samples):
        time.sleep(rng.uniform(0.25, 1.25))    # idle: the workers are asleep again
        scheduled, started, finished, *ended = run_one()
        pickup.append(started - scheduled)
        done.append(finished - scheduled)
        woken.extend(finished - end for end in ended)
    if woken:
        extra.update(woken_p50=percentile(woken, 50), woken_p95=percentile(woken, 95), woken_max=max(woken))
    emit(samples=len(pickup),
         pickup_p50=percentile(pickup, 50), pickup_p95=percentile(pickup, 95), pickup_max=max(pickup),
         done_p50=percentile(done, 50), done_p95=percentile(done, 95), done_max=max(done), **extra)


# --- fresh databases ------------------------------------------------------------------------------

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _psql(admin_url, sql):
    import subprocess
    parts = urllib.parse.urlsplit(admin_url)
    cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", parts.hostname or "127.0.0.1",
           "-p", str(parts.port or 5432), "-U", parts.username or "postgres", "-d",
           parts.path.lstrip("/") or "postgres", "-c", sql]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def postgres_reachable(admin_url=PG_ADMIN):
    """None when the server answers, else the reason it does not."""
    import shutil
    import subprocess
    if shutil.which("psql") is None:
        return "psql is not installed"
    try:
        done = _psql(admin_url, "SELECT 1")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"psql failed: {exc}"
    return None if done.returncode == 0 else (done.stderr.strip() or "psql failed")


class FreshDatabase:
    """A new, empty database for one workload run: a SQLite file in a new temporary directory, or
    a new PostgreSQL database on the server of ``backend_url``. Removed again on exit."""

    def __init__(self, backend, scratch_root=None):
        self.backend = backend
        self.scratch_root = scratch_root
        self.url = None
        self._dir = None
        self._pg_name = None

    def __enter__(self):
        import tempfile
        if self.backend == "sqlite":
            self._dir = tempfile.mkdtemp(prefix="lilota-bench-", dir=self.scratch_root)
            self.path = os.path.join(self._dir, "bench.db")
            self.url = "sqlite:///" + self.path
        else:
            self._pg_name = "lilota_bench_" + uuid.uuid4().hex[:12]
            done = _psql(PG_ADMIN, f"CREATE DATABASE {self._pg_name}")
            if done.returncode != 0:
                raise RuntimeError(f"cannot create database {self._pg_name}: {done.stderr.strip()}")
            parts = urllib.parse.urlsplit(PG_ADMIN)
            self.url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/" + self._pg_name, "", ""))
            self.path = None
        return self

    def __exit__(self, *exc):
        import shutil
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        if self._pg_name is not None:
            _psql(PG_ADMIN, f"DROP DATABASE IF EXISTS {self._pg_name} WITH (FORCE)")
        return False


def sqlite_path(url):
    """The file of a ``sqlite:///`` URL."""
    path = urllib.parse.urlsplit(url).path
    return path[1:] if path.startswith("/") else path


def db_bytes(url):
    """Size of a SQLite database file (WAL checkpointed into it first)."""
    import sqlite3
    path = sqlite_path(url)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    total = 0
    for suffix in ("", "-wal"):
        if os.path.exists(path + suffix):
            total += os.path.getsize(path + suffix)
    return total


def main(workloads, db_arg="--url", **defaults):
    """The command line of a workload script: ``SCRIPT WORKLOAD --url URL [--n N] ...``; runs the
    workload function named, with the parsed arguments."""
    import argparse   # here, not at the top: see the module's docstring
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=sorted(workloads))
    parser.add_argument(db_arg, required=True)
    for name in ("n", "workers", "samples", "depth", "busy"):
        parser.add_argument(f"--{name}", type=int, default=defaults.get(name, 0))
    args = parser.parse_args()
    workloads[args.workload](args)


def wait_until(predicate, timeout=20.0, interval=0.02, message="condition", error=TimeoutError):
    """Poll ``predicate`` until it returns a true value (returned); raise ``error`` once ``timeout``
    seconds pass. The one polling loop of the benchmark and the tests (tests/support.py, which
    raises AssertionError: a test that waits in vain fails)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)
