"""The floor: the same SQL work as lilota, in a raw loop in one process, with no library around it.

    python bench/floor.py insert|insert_many|claim_complete --url URL --n N

* insert:         N single-row INSERTs, each its own (durable) transaction -- what schedule() does.
* insert_many:    N rows in one executemany() transaction -- what schedule_many() does.
* claim_complete: N queued tasks, then a loop of the claim UPDATE ... RETURNING followed by the
                  completion UPDATE, each its own transaction -- what a worker does per task.

The schema is lilota's (created through lilota, so that the indexes are the same); the loops use
the driver directly with the same connection settings (SQLite: WAL, synchronous=NORMAL). The rows
(time-ordered ids and JSON inputs like lilota's) are made before the clock starts: the floor is the database's
work and the loop around it, nothing else.
"""

import argparse
import json
import os
import sqlite3
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, sqlite_path  # noqa: E402

INSERT = ("INSERT INTO lilota_task (id, name, status, priority, run_at, attempts, progress_percentage, "
          "input, created_at, cancel_requested) VALUES (?, 'noop', 'scheduled', 0, ?, 0, 0, ?, ?, 0)")

SQLITE_CLAIM = ("UPDATE lilota_task SET status = 'running', pid = ?, attempts = attempts + 1, locked_by = ?, "
                "locked_at = ?, start_date_time = ? WHERE id = (SELECT id FROM lilota_task "
                "INDEXED BY lilota_task_queue WHERE status = 'scheduled' AND run_at <= ? "
                "ORDER BY priority DESC, run_at LIMIT 1) RETURNING id, name, input")
POSTGRES_CLAIM = ("UPDATE lilota_task SET status = 'running', pid = %s, attempts = attempts + 1, locked_by = %s, "
                  "locked_at = %s, start_date_time = %s WHERE id = (SELECT id FROM lilota_task "
                  "WHERE status = 'scheduled' AND run_at <= %s ORDER BY priority DESC, run_at LIMIT 1 "
                  "FOR UPDATE SKIP LOCKED) RETURNING id, name, input")
COMPLETE = ("UPDATE lilota_task SET status = 'completed', output = ?, end_date_time = ?, "
            "progress_percentage = 100 WHERE id = ? AND status = 'running' AND locked_by = ?")


def prepare_schema(url):
    import lilota
    storage = lilota.Storage.for_url(url)
    storage.ensure_ready()
    storage.close()


def connect(url):
    if url.startswith("sqlite"):
        conn = sqlite3.connect(sqlite_path(url), isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn
    raise SystemExit("the PostgreSQL floor needs lilota's PostgreSQL dialect (for the schema and its time "
                     "encoding); it is not there yet")


def _ids(n):
    """Time-ordered version 7 UUIDs, as lilota makes them (the key order decides how the primary
    key index grows, so the floor writes the same kind of keys)."""
    prefix = (time.time_ns() // 1_000_000) << 80 | (7 << 76) | (0b10 << 62)
    mask = (1 << 76) - 1 - (0b11 << 62)
    return [str(uuid.UUID(int=prefix | (int.from_bytes(os.urandom(10), "big") & mask))) for _ in range(n)]


def _rows(n):
    now = time.time()
    return [(task_id, now, json.dumps({"i": i}, separators=(",", ":")), now) for i, task_id in enumerate(_ids(n))]


def insert(conn, n):
    rows = _rows(n)
    execute = conn.execute
    t0 = time.perf_counter()
    for row in rows:
        execute(INSERT, row)
    return time.perf_counter() - t0


def insert_many(conn, n):
    rows = _rows(n)
    t0 = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(INSERT, rows)
    conn.execute("COMMIT")
    return time.perf_counter() - t0


def claim_complete(conn, n):
    insert_many(conn, n)
    node, pid = str(uuid.uuid4()), os.getpid()
    done = 0
    t0 = time.perf_counter()
    while True:
        now = time.time()
        rows = conn.execute(SQLITE_CLAIM, (pid, node, now, now, now)).fetchall()
        if not rows:
            break
        conn.execute(COMPLETE, (None, time.time(), rows[0][0], node))
        done += 1
    elapsed = time.perf_counter() - t0
    assert done == n, (done, n)
    return elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["insert", "insert_many", "claim_complete"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    prepare_schema(args.url)
    conn = connect(args.url)
    elapsed = globals()[args.workload](conn, args.n)
    conn.close()
    emit(rate=args.n / elapsed, n=args.n, seconds=elapsed)


if __name__ == "__main__":
    main()
