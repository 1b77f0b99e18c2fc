"""Transactional enqueue: schedule(..., connection=conn) writes inside the application's own open
transaction (sqlite3, psycopg 3, psycopg2, pg8000, and through SQLAlchemy): the task exists only if
the application commits, and workers wake at the commit. Every class runs on SQLite and PostgreSQL."""

import importlib
import sqlite3
import threading
import urllib.parse

import support

from lilota import LilotaScheduler, LilotaWorker, TaskStatus


def _driver_connect(driver, db_url):
    """A connection of ``driver`` to the test server, in the driver's default (transactional) mode."""
    parts = urllib.parse.urlsplit(db_url)
    host, port, user, database = parts.hostname, parts.port or 5432, parts.username, parts.path.lstrip("/")
    if driver == "pg8000":
        module = importlib.import_module("pg8000.dbapi")
        return module.connect(host=host, port=port, user=user, database=database)
    module = importlib.import_module(driver)
    return module.connect(host=host, port=port, user=user, dbname=database)


@support.on_every_backend
class TransactionalEnqueueTests(support.TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.app = LilotaScheduler(self.db_url)
        self.app.storage.ensure_ready()
        self.connections = []

    def connect(self, driver=None):
        """The application's own connection, with a table of its own (orders)."""
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.db_path)
        else:
            try:
                conn = _driver_connect(driver or "psycopg", self.db_url)
            except ImportError:
                self.skipTest(f"{driver} is not installed")
            cursor = conn.cursor()
            cursor.execute(f'SET search_path TO "{self.schema}"')
            conn.commit()
        self.addCleanup(conn.close)
        cursor = conn.cursor()
        cursor.execute(self.orders_ddl())
        conn.commit()
        return conn

    def orders_ddl(self):
        key = "INTEGER PRIMARY KEY" if self.backend == "sqlite" else "SERIAL PRIMARY KEY"
        return f"CREATE TABLE IF NOT EXISTS orders (id {key}, item TEXT)"

    def drivers(self):
        return [None] if self.backend == "sqlite" else ["psycopg", "psycopg2", "pg8000"]

    def count(self, table):
        return self.db_execute(f"SELECT COUNT(*) FROM {table}")[0][0]

    def test_commit_stores_and_rollback_leaves_nothing(self):
        for driver in self.drivers():
            with self.subTest(driver=driver):
                conn = self.connect(driver)
                cursor = conn.cursor()
                cursor.execute("INSERT INTO orders (item) VALUES ('book')")
                kept = self.app.schedule("ship", {"item": "book"}, connection=conn)
                many = self.app.schedule_many("ship", [1, 2], connection=conn)
                self.assertIsNone(self.app.get_task_by_id(kept), "not visible before the commit")
                conn.commit()
                self.assertEqual(self.app.get_task_by_id(kept).status, TaskStatus.SCHEDULED)
                self.assertEqual(self.app.get_task_by_id(kept).input, {"item": "book"})
                self.assertEqual([self.app.get_task_by_id(i).input for i in many], [1, 2])

                cursor = conn.cursor()
                cursor.execute("INSERT INTO orders (item) VALUES ('pen')")
                dropped = self.app.schedule("ship", {"item": "pen"}, connection=conn, unique_key="pen")
                conn.rollback()
                self.assertIsNone(self.app.get_task_by_id(dropped))
                self.assertEqual(self.count("lilota_task"), 3)
                self.db_execute("DELETE FROM lilota_task")
                self.db_execute("DELETE FROM orders")

    def test_failing_transaction_leaves_nothing(self):
        conn = self.connect()
        cursor = conn.cursor()
        cursor.execute("INSERT INTO orders (id, item) VALUES (1, 'book')")
        conn.commit()
        cursor = conn.cursor()
        task_id = self.app.schedule("ship", {"id": 1}, connection=conn)
        with self.assertRaises(Exception):
            cursor.execute("INSERT INTO orders (id, item) VALUES (1, 'again')")   # the primary key
        conn.rollback()
        self.assertIsNone(self.app.get_task_by_id(task_id))
        self.assertEqual(self.count("lilota_task"), 0)
        # An input that cannot be stored raises before anything is written: the transaction goes on.
        cursor = conn.cursor()
        cursor.execute("INSERT INTO orders (id, item) VALUES (2, 'pen')")
        with self.assertRaises(TypeError):
            self.app.schedule("ship", {"bad": object()}, connection=conn)
        conn.commit()
        self.assertEqual((self.count("orders"), self.count("lilota_task")), (2, 0))

    def test_committed_task_runs_and_rolled_back_one_wakes_nobody(self):
        conn = self.connect()
        counter = support.wake_signal(self)
        cursor = conn.cursor()
        cursor.execute("INSERT INTO orders (item) VALUES ('pen')")
        self.app.schedule("ship", {"item": "pen"}, connection=conn)
        conn.rollback()
        self.assertFalse(counter(0.3), "a rolled-back task wakes no worker")
        script = self.worker_script("""
            @worker.register("ship")
            def ship(data):
                return {"shipped": data["item"]}
            """)
        app = self.start_lilota(script, number_of_workers=1)
        self.wait_workers_running(1)
        cursor = conn.cursor()
        cursor.execute("INSERT INTO orders (item) VALUES ('book')")
        task_id = app.schedule("ship", {"item": "book"}, connection=conn)
        conn.commit()
        self.assertEqual(app.wait(task_id, timeout=30).output, {"shipped": "book"})
        self.assertEqual(self.count("lilota_task"), 1)

    def test_commit_wakes_workers(self):
        conn = self.connect()
        woken = support.wake_signal(self)
        self.app.schedule("ship", connection=conn)
        self.assertFalse(woken(0.2), "nothing before the commit")
        conn.commit()
        self.assertTrue(woken(10))

    def test_unique_key_waits_for_the_open_transaction(self):
        conn = self.connect()
        held = self.app.schedule("sync", connection=conn, unique_key="sync")
        other = {}
        thread = threading.Thread(target=lambda: other.setdefault("id", LilotaScheduler(self.db_url).schedule(
            "sync", unique_key="sync")))
        thread.start()
        thread.join(0.3)
        self.assertTrue(thread.is_alive(), "the second scheduler of the key waits for the transaction")
        conn.rollback()
        thread.join(30)
        self.assertNotEqual(other["id"], held)
        self.assertEqual(self.app.get_task_by_id(other["id"]).unique_key, "sync")
        self.assertEqual(self.app.schedule("sync", connection=conn, unique_key="sync"), other["id"])
        conn.commit()

    def test_autocommit_connection_commits_each_call(self):
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.db_path, isolation_level=None)
        else:
            conn = _driver_connect("psycopg", self.db_url)
            conn.autocommit = True
        self.addCleanup(conn.close)
        first = self.app.schedule("x", connection=conn, unique_key="k")
        self.assertEqual(self.app.get_task_by_id(first).status, TaskStatus.SCHEDULED)
        self.assertEqual(self.app.schedule("x", connection=conn, unique_key="k"), first)

    def test_wrong_connection_kind(self):
        if self.backend == "sqlite":
            try:
                conn = _driver_connect("psycopg", support.POSTGRES_URL or "postgresql://127.0.0.1:1/none")
            except Exception:
                conn = object()   # no server: what matters is the kind of object
            else:
                self.addCleanup(conn.close)
            with self.assertRaisesRegex(TypeError, r"connection= is a .*but db_url names the SQLite database"):
                self.app.schedule("x", connection=conn)
            other = sqlite3.connect(self.path("other.db"))
            self.addCleanup(other.close)
            with self.assertRaisesRegex(ValueError, "other.db"):
                self.app.schedule("x", connection=other)
        else:
            conn = sqlite3.connect(":memory:")
            self.addCleanup(conn.close)
            with self.assertRaisesRegex(TypeError, r"connection= is a sqlite3.Connection, but db_url names the "
                                                   r"PostgreSQL database.*psycopg, psycopg2 or pg8000"):
                self.app.schedule("x", connection=conn)
        with self.assertRaisesRegex(TypeError, "connection= is a builtins.object"):
            self.app.schedule_many("x", [1], connection=object())
        self.assertEqual(self.count("lilota_task"), 0)

    def test_sqlalchemy_raw_connection(self):
        sqlalchemy, engine = support.sqlalchemy_engine(self)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(self.orders_ddl()))
            connection.commit()
        with engine.begin() as connection:   # commits at the end of the block
            connection.execute(sqlalchemy.text("INSERT INTO orders (item) VALUES ('book')"))
            kept = self.app.schedule("ship", {"item": "book"}, connection=connection.connection)
        self.assertEqual(self.app.get_task_by_id(kept).status, TaskStatus.SCHEDULED)
        with self.assertRaises(RuntimeError):
            with engine.begin() as connection:   # rolls back on the exception
                connection.execute(sqlalchemy.text("INSERT INTO orders (item) VALUES ('pen')"))
                dropped = self.app.schedule("ship", {"item": "pen"}, connection=connection.connection.driver_connection)
                raise RuntimeError("the order failed")
        self.assertIsNone(self.app.get_task_by_id(dropped))
        self.assertEqual((self.count("orders"), self.count("lilota_task")), (1, 1))
        # The Connection itself, and a Session's, are unwrapped too.
        with engine.begin() as connection:
            also = self.app.schedule("ship", {"item": "ink"}, connection=connection)
        orm = importlib.import_module("sqlalchemy.orm")
        with orm.Session(engine) as session, session.begin():
            session.execute(sqlalchemy.text("INSERT INTO orders (item) VALUES ('cup')"))
            last = self.app.schedule("ship", {"item": "cup"}, connection=session.connection())
        self.assertEqual([self.app.get_task_by_id(i).input for i in (also, last)], [{"item": "ink"}, {"item": "cup"}])
        self.assertEqual(self.count("orders"), 2)


@support.on_every_backend
class TransactionalWorkerRunsTests(support.TempDirTestCase):
    """run_pending() sees exactly what was committed."""

    def test_only_committed_tasks_run(self):
        app = LilotaScheduler(self.db_url)
        app.storage.ensure_ready()
        worker = LilotaWorker(self.db_url)
        ran = []
        worker.register("job")(lambda data: ran.append(data))
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.db_path)
        else:
            conn = _driver_connect("psycopg2", self.db_url)
        self.addCleanup(conn.close)
        app.schedule("job", "rolled back", connection=conn)
        conn.rollback()
        app.schedule("job", "committed", connection=conn)
        conn.commit()
        worker.run_pending()
        self.assertEqual(ran, ["committed"])
