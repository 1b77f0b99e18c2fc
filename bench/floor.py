"""The floor: the same SQL work as lilota, in a raw loop in one process, with no library around it.

    python bench/floor.py insert|insert_many|insert_bulk|claim_complete|claim_complete_one_commit --url URL --n N

* insert:         N single-row INSERTs, each its own (durable) transaction -- what schedule() does.
* insert_many:    N rows in one executemany() transaction: what schedule_many() did before issue 16.
* insert_bulk:    the same N rows in one transaction the fastest raw way there is: on SQLite
                  multi-row INSERTs of 499 rows each (999 parameters, the limit of every SQLite;
                  the shared values are numbered parameters that every row reuses) -- about
                  twice as fast as executemany(); on PostgreSQL one COPY ... FROM STDIN of the rows
                  in COPY's text format, made before the clock starts -- 4 to 5 times as fast.
                  schedule_many()'s target (issue 16) is a share of the faster of the two floors.
* claim_complete: N queued tasks, then a loop of the claim UPDATE ... RETURNING followed by the
                  completion UPDATE, each its own transaction -- the floor the issue defines.
* claim_complete_one_commit: the same two statements, but each completion and the claim of the
                  next task in one commit, as a busy lilota worker does: one transaction on SQLite,
                  one statement (two data-modifying WITH clauses) on PostgreSQL.

The schema is lilota's (created through lilota, so that the indexes are the same); the loops use
the driver directly with the same connection settings (SQLite: WAL, lilota's synchronous; on
PostgreSQL the driver's connection as lilota's dialect opens it, in autocommit mode). The rows
(time-ordered ids and JSON inputs like lilota's) are made before the clock starts: the floor is
the database's work and the loop around it, nothing else.
"""

import json
import os
import sqlite3
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import main, emit, sqlite_path  # noqa: E402

INSERT = ("INSERT INTO lilota_task (id, name, status, priority, run_at, attempts, progress_percentage, "
          "input, created_at, cancel_requested) VALUES (?, 'noop', 'scheduled', 0, ?, 0, 0, ?, ?, 0)")

CLAIM = {
    "sqlite": ("UPDATE lilota_task SET status = 'running', pid = ?, attempts = attempts + 1, locked_by = ?, "
               "locked_at = ?, start_date_time = ? WHERE id = (SELECT id FROM lilota_task "
               "INDEXED BY lilota_task_queue WHERE status = 'scheduled' AND run_at <= ? "
               "ORDER BY priority DESC, run_at LIMIT 1) RETURNING id, name, input"),
    "postgresql": ("UPDATE lilota_task SET status = 'running', pid = ?, attempts = attempts + 1, locked_by = ?, "
                   "locked_at = ?, start_date_time = ? WHERE id = (SELECT id FROM lilota_task "
                   "WHERE status = 'scheduled' AND run_at <= ? ORDER BY priority DESC, run_at LIMIT 1 "
                   "FOR UPDATE SKIP LOCKED) RETURNING id, name, input"),
}
COMPLETE = ("UPDATE lilota_task SET status = 'completed', output = ?, end_date_time = ?, "
            "progress_percentage = 100 WHERE id = ? AND status = 'running' AND locked_by = ?")
# PostgreSQL: the completion and the next claim in one statement (parameters: completion's, claim's).
COMPLETE_AND_CLAIM = (f"WITH done AS ({COMPLETE}), next AS ({CLAIM['postgresql']}) "
                      "SELECT next.* FROM (SELECT 1) AS one LEFT JOIN next ON TRUE")


class Database:
    """The driver's connection and what differs between databases: placeholders, and how a time
    and a JSON value are stored (asked of lilota's dialect, which made the schema)."""

    def __init__(self, url):
        import lilota
        storage = lilota.Storage.for_url(url)
        storage.ensure_ready()             # lilota's schema, indexes included
        storage.close()
        self.dialect = dialect = storage.dialect
        self.kind = "sqlite" if url.startswith("sqlite") else "postgresql"
        if self.kind == "sqlite":
            self.conn = sqlite3.connect(sqlite_path(url), isolation_level=None, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute(f"PRAGMA synchronous={dialect.synchronous}")
            self.cur = self.conn
        else:
            # lilota's wrapper around the driver's connection (opened in autocommit mode, with
            # lilota's settings); the loops use one cursor of the driver's own.
            self.conn = dialect.connect()
            self.cur = self.conn.raw.cursor()
        self.time, self.json = dialect.encode_time, dialect.encode_json
        self.insert, self.claim, self.complete = (dialect.sql(INSERT), dialect.sql(CLAIM[self.kind]),
                                                  dialect.sql(COMPLETE))
        self.complete_and_claim = dialect.sql(COMPLETE_AND_CLAIM)

    def begin(self):
        self.cur.execute("BEGIN IMMEDIATE" if self.kind == "sqlite" else "BEGIN")

    def commit(self):
        self.cur.execute("COMMIT")


def _ids(n):
    """Time-ordered version 7 UUIDs, increasing as lilota makes them (the key order decides how the
    primary key index grows, so the floor writes the same kind of keys: ids in random order -- as
    random bits after one millisecond's prefix are -- made the bulk insert on SQLite 2.3 times as
    slow)."""
    prefix = (time.time_ns() // 1_000_000) << 80 | (7 << 76) | (0b10 << 62)
    mask = (1 << 76) - 1 - (0b11 << 62)
    return [str(uuid.UUID(int=prefix | bits)) for bits in sorted(int.from_bytes(os.urandom(10), "big") & mask
                                                                 for _ in range(n))]


def _rows(db, n):
    now = db.time(time.time())
    return [(task_id, now, db.json(json.dumps({"i": i}, separators=(",", ":"))), now)
            for i, task_id in enumerate(_ids(n))]


def insert(db, n):
    rows = _rows(db, n)
    execute, sql = db.cur.execute, db.insert
    t0 = time.perf_counter()
    for row in rows:
        execute(sql, row)
    return time.perf_counter() - t0


def insert_many(db, n):
    rows = _rows(db, n)
    t0 = time.perf_counter()
    db.begin()
    db.cur.executemany(db.insert, rows)
    db.commit()
    return time.perf_counter() - t0


# The multi-row INSERT of insert_bulk: the rows' own values (id, input) in a VALUES list, the time
# they share a numbered parameter (?1) that each of them reuses.
BULK_ROWS = 499
BULK_INSERT = ("INSERT INTO lilota_task (id, name, status, priority, run_at, attempts, progress_percentage, "
               "input, created_at, cancel_requested) SELECT column1, 'noop', 'scheduled', 0, ?1, 0, 0, column2, ?1, 0 "
               "FROM (VALUES {})")
COPY = ("COPY lilota_task (id, name, status, priority, run_at, attempts, progress_percentage, input, created_at, "
        "cancel_requested) FROM STDIN")


def insert_bulk(db, n):
    rows = _rows(db, n)
    if db.kind == "sqlite":
        now = rows[0][1] if rows else None
        flat = [value for task_id, _, data, _ in rows for value in (task_id, data)]
        statements = [(BULK_INSERT.format(", ".join(["(?, ?)"] * (len(flat[i:i + 2 * BULK_ROWS]) // 2))),
                       [now] + flat[i:i + 2 * BULK_ROWS]) for i in range(0, len(flat), 2 * BULK_ROWS)]
        t0 = time.perf_counter()
        db.begin()
        for sql, params in statements:
            db.cur.execute(sql, params)
        db.commit()
        return time.perf_counter() - t0
    # COPY's text format: fields by tabs, rows by newlines; a time in ISO 8601. The JSON of these
    # inputs holds no backslash, tab or newline, which the format would have to escape.
    if type(db.conn.raw).__module__.partition(".")[0] != "psycopg":
        raise SystemExit("floor insert_bulk: COPY is written for psycopg 3 (postgresql+psycopg://)")
    data = "".join(f"{task_id}\tnoop\tscheduled\t0\t{now.isoformat()}\t0\t0\t{data}\t{created.isoformat()}\t0\n"
                   for task_id, now, data, created in rows).encode()
    cur = db.conn.raw.cursor()
    t0 = time.perf_counter()
    db.begin()
    with cur.copy(COPY) as copy:
        copy.write(data)
    db.commit()
    return time.perf_counter() - t0


def claim_complete(db, n):
    insert_many(db, n)
    node, pid = str(uuid.uuid4()), os.getpid()
    cur, claim, complete, encode = db.cur, db.claim, db.complete, db.time
    done = 0
    t0 = time.perf_counter()
    while True:
        now = encode(time.time())
        result = cur.execute(claim, (pid, node, now, now, now))   # psycopg2's execute returns None
        rows = (cur if result is None else result).fetchall()
        if not rows:
            break
        cur.execute(complete, (None, encode(time.time()), rows[0][0], node))
        done += 1
    elapsed = time.perf_counter() - t0
    assert done == n, (done, n)
    return elapsed


def claim_complete_one_commit(db, n):
    insert_many(db, n)
    node, pid = str(uuid.uuid4()), os.getpid()
    cur, claim, complete, encode = db.cur, db.claim, db.complete, db.time
    done = 0
    t0 = time.perf_counter()
    now = encode(time.time())
    result = cur.execute(claim, (pid, node, now, now, now))
    rows = (cur if result is None else result).fetchall()
    row = rows[0] if rows else None
    while row is not None:
        now = encode(time.time())
        if db.kind == "sqlite":
            db.begin()
            cur.execute(complete, (None, now, row[0], node))
            rows = cur.execute(claim, (pid, node, now, now, now)).fetchall()   # all: the statement ends
            db.commit()
            row = rows[0] if rows else None
        else:
            result = cur.execute(db.complete_and_claim, (None, now, row[0], node, pid, node, now, now, now))
            row = (cur if result is None else result).fetchone()
            row = row if row[0] is not None else None
        done += 1
    elapsed = time.perf_counter() - t0
    assert done == n, (done, n)
    return elapsed


def _measure(loop):
    def workload(args):
        db = Database(args.url)
        elapsed = loop(db, args.n)
        db.conn.close()
        emit(rate=args.n / elapsed, n=args.n, seconds=elapsed)
    return workload


WORKLOADS = {loop.__name__: _measure(loop) for loop in (insert, insert_many, insert_bulk, claim_complete,
                                                        claim_complete_one_commit)}


if __name__ == "__main__":
    main(WORKLOADS, n=10_000)
