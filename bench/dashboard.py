"""The dashboard's speed on a big SQLite database: how long its overview and task list take to answer.

    python bench/dashboard.py                    # 1,000,000 tasks (about a minute to build), 40 requests each
    python bench/dashboard.py --tasks 100000 --requests 20
    python bench/dashboard.py --db /tmp/big.db   # keep (or reuse) the database

The database is built the way a long-running application leaves one: tasks made over 30 days
(20,000 of them in the last hour, the newest 5,000 still queued), 94 % completed, 3 % failed with a handful of different errors,
some expired, cancelled, queued and running, in three queues and six task names, each with a small
JSON input and output. Rows are written with SQL (the same columns lilota writes) after lilota has
made the schema, so every index is there and maintained as the rows go in.

Each endpoint is asked ``--requests`` times over HTTP (one connection per request, as a browser's
poll does) after two warm-up requests; the figures are the median (p50), p95 and max, in ms.
"""

import argparse
import http.client
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lilota  # noqa: E402

NAMES = ["send_email", "resize_image", "generate_report", "sync_inventory", "charge_card", "export_csv"]
QUEUES = ["default", "emails", "reports"]
ERRORS = [("ConnectionError", "warehouse API at inventory.internal:8443 refused the connection"),
          ("ValueError", "account has no billing address"), ("KeyError", "'sku'"),
          ("TimeoutError", "SMTP server did not answer within 30s"), ("PermissionError", "bucket is read-only"),
          ("RuntimeError", "PDF renderer crashed"), ("ZeroDivisionError", "division by zero"),
          ("OSError", "[Errno 28] No space left on device")]


def build(path, count, seed=5):
    """A database of ``count`` tasks at ``path`` (made by lilota's schema, filled with SQL)."""
    url = "sqlite:///" + path
    lilota.LilotaScheduler(url).storage.ensure_ready()
    lilota.Storage.for_url(url).close()
    rng = random.Random(seed)
    now = time.time()
    recent = min(20000, count // 10)
    old = count - recent
    ids = lilota._new_task_ids(count)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    columns = ("id, name, status, priority, run_at, attempts, max_attempts, timeout, progress_percentage, "
               "start_date_time, end_date_time, input, output, error, locked_by, created_at, "
               "cancel_requested, keep_input, queue")
    insert = f"INSERT INTO lilota_task ({columns}) VALUES ({', '.join('?' * 19)})"
    started = time.perf_counter()
    batch = []
    for i, task_id in enumerate(ids):
        if i < old:
            created = now - 30 * 86400 + (30 * 86400 - 3600) * i / old
        else:
            created = now - 3600 + 3590 * (i - old) / recent
        name = NAMES[i % len(NAMES)]
        queue = QUEUES[i % len(QUEUES)]
        roll = rng.random()
        newest = i >= count - count // 200   # the newest 5,000 are still queued
        if newest and roll < 0.999:
            status = "scheduled"
        elif i >= count - 40 and roll >= 0.999:
            status = "running"
        elif roll < 0.03:
            status = "failed"
        elif roll < 0.035:
            status = "expired"
        elif roll < 0.04:
            status = "cancelled"
        else:
            status = "completed"
        start = end = output = error = locked = None
        attempts, progress = 0, 0
        if status not in ("scheduled", "cancelled"):
            start = created + rng.uniform(0.001, 2)
            attempts, locked = 1, "00000000-0000-4000-8000-00000000000%d" % (i % 8)
            if status != "running":
                end = start + rng.expovariate(1 / 1.5)
                progress = 100 if status == "completed" else rng.randrange(100)
        if status == "cancelled":
            end = created + 1
            error = json.dumps({"type": "TaskCancelledError", "message": "cancelled before it ran", "traceback": None})
        if status == "completed":
            output = json.dumps({"ok": True, "took": round(end - start, 3)})
        elif status in ("failed", "expired"):
            kind, message = ERRORS[int(rng.random() ** 2 * len(ERRORS))] if status == "failed" else \
                ("TaskTimeoutError", "ran longer than its timeout of 300s")
            error = json.dumps({"type": kind, "message": message, "attempt": 1,
                                "traceback": f"Traceback (most recent call last):\n  File \"tasks.py\", line 42, "
                                             f"in {name}\n{kind}: {message}\n"})
        batch.append((str(task_id), name, status, 0, created, attempts, 1, 300.0, progress, start, end,
                      json.dumps({"user": i % 5000, "item": f"item-{i}"}), output, error, locked, created, 0, 1, queue))
        if len(batch) == 50000:
            db.executemany(insert, batch)
            db.commit()
            batch = []
    db.executemany(insert, batch)
    db.commit()
    db.execute("ANALYZE")
    db.close()
    return time.perf_counter() - started


def measure(server, path, requests):
    """Milliseconds of ``requests`` GETs of ``path`` (after two warm-ups)."""
    times = []
    for i in range(requests + 2):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        began = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        elapsed = (time.perf_counter() - began) * 1000
        conn.close()
        if response.status != 200:
            raise SystemExit(f"{path}: HTTP {response.status}: {body[:200]!r}")
        if i >= 2:
            times.append(elapsed)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))], times[-1], len(body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--db", help="the database file (built when missing, else reused)")
    args = parser.parse_args()
    path = args.db or os.path.join(tempfile.mkdtemp(prefix="lilota-dash-bench-"), "big.db")
    if not os.path.exists(path):
        took = build(path, args.tasks)
        print(f"built {args.tasks:,} tasks in {took:.0f}s: {path} ({os.path.getsize(path) / 1e6:.0f} MB)")
    server = lilota.serve_dashboard("sqlite:///" + path, port=0)
    began = time.perf_counter()
    first = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    first.request("GET", "/api/stats")
    first.getresponse().read()
    first.close()
    print(f"overview, first request (counts every task once): {(time.perf_counter() - began) * 1000:.0f} ms")
    some_id = lilota.LilotaScheduler("sqlite:///" + path).list_tasks(status="completed", limit=1)[0].id
    middle = lilota.Storage.for_url("sqlite:///" + path).task_ids_between(
        "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff", args.tasks // 2)[-1]
    cases = [
        ("overview: /api/stats", "/api/stats"),
        ("list, first page: /api/tasks", "/api/tasks"),
        ("list, a page deep in: ?before=(the middle)", f"/api/tasks?before={middle}"),
        ("list, failed: ?status=failed", "/api/tasks?status=failed"),
        ("list, one name and queue", "/api/tasks?name=charge_card&queue=emails"),
        ("list, id search: ?q=(8 digits)", f"/api/tasks?q={str(some_id)[:8]}"),
        ("list, error search: ?q=billing", "/api/tasks?q=billing"),
        ("one task: /api/tasks/ID", f"/api/tasks/{some_id}"),
        ("nodes: /api/nodes", "/api/nodes"),
    ]
    print(f"{'endpoint':46} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'bytes':>8}")
    try:
        for label, target in cases:
            p50, p95, worst, size = measure(server, target, args.requests)
            print(f"{label:46} {p50:8.1f} {p95:8.1f} {worst:8.1f} {size:8d}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
