"""The bulk path (issue 16): schedule_many() reads its inputs a chunk at a time and writes them as it
goes -- multi-row INSERTs on SQLite, COPY on PostgreSQL -- and keeps every promise of the call that
serialized everything first: one transaction, ids in input order, unique keys, dependencies,
connection=, nothing written after a bad input, the NOTIFY that wakes the workers. Every class runs
on SQLite and PostgreSQL; the chunk is made small (and on SQLite the statement too) so that a few
hundred inputs span many of them. The PostgreSQL drivers other than psycopg 3 run where installed.
What it makes for many inputs at once -- task ids, their texts, the inputs' JSON -- equals what it
makes for one."""

import importlib
import re
import sqlite3
import unittest
import unittest.mock
import uuid

import support

import lilota
from lilota import LilotaScheduler, TaskStatus

CHUNK = 100    # inputs per chunk in these tests (lilota's: _BULK_CHUNK)


def _inputs(count, bad_at=None):
    """A generator of ``count`` inputs (dicts), the one at ``bad_at`` a set, which JSON cannot hold."""
    for i in range(count):
        yield {1, 2} if i == bad_at else {"i": i}


class ManyAtOnceTests(unittest.TestCase):

    def test_ids_and_their_texts(self):
        for count in (1, 9, 10, 2500):
            with self.subTest(count=count):
                ints = lilota._new_task_id_ints(count)
                self.assertEqual(ints, sorted(set(ints)), "increasing")
                made = lilota._uuids(ints)
                built = [uuid.UUID(int=value) for value in ints]
                self.assertEqual(made, built)
                self.assertEqual([(u.version, u.variant, u.is_safe) for u in made],
                                 [(u.version, u.variant, u.is_safe) for u in built])
                self.assertEqual(lilota._uuid_texts(ints), [str(u) for u in built])
        self.assertTrue(lilota._DIRECT_UUIDS, "this Python's UUIDs are made without their constructor")

    def test_json_of_many(self):
        plain = [{"i": i, "s": "\u00e9", "l": [1.5, None, True]} for i in range(50)]
        self.assertEqual(lilota._dumps_many(plain), [lilota.dumps(value) for value in plain])
        careful = plain + [(1, 2), uuid.UUID(int=5), {"deep": [[[[]]]]}]
        self.assertEqual(lilota._dumps_many(careful), [lilota.dumps(value) for value in careful])
        for bad, error in (([1, float("nan")], ValueError), ([1, {"k": {1}}], TypeError),
                           ([1, {2: "x"}], TypeError), ([1, "\ud800"], ValueError), ([1, 10 ** 5000], ValueError)):
            with self.subTest(error=error.__name__, kind=type(bad[1]).__name__):
                with self.assertRaises(lilota.UnserializableError) as caught:
                    lilota._dumps_many(bad)
                self.assertIsInstance(caught.exception, error)


class BulkTestCase(support.TempDirTestCase):

    def setUp(self):
        super().setUp()
        patch = unittest.mock.patch.object(lilota, "_BULK_CHUNK", CHUNK)
        patch.start()
        self.addCleanup(patch.stop)
        # SQLite: 8 rows a statement (999 parameters is lilota's), so that statements end inside a
        # chunk and rows of one chunk wait for the next one's.
        statement = unittest.mock.patch.object(lilota.SQLiteDialect, "max_parameters", 16 + 2 * 8 + 1)
        statement.start()
        self.addCleanup(statement.stop)
        self.app = LilotaScheduler(self.db_url)
        self.app.storage.ensure_ready()

    def count(self, table="lilota_task"):
        return self.db_execute(f"SELECT COUNT(*) FROM {table}")[0][0]

    def inputs_by_id(self):
        return {task.id: task.input for task in self.app.list_tasks(limit=None)}


@support.on_every_backend
class BulkScheduleTests(BulkTestCase):

    def test_generator_of_many_chunks(self):
        ids = self.app.schedule_many("noop", _inputs(CHUNK * 5 + 37), priority=3, queue="bulk")
        self.assertEqual(len(ids), CHUNK * 5 + 37)
        self.assertEqual(ids, sorted(ids), "ids increase in input order")
        self.assertEqual(self.inputs_by_id(), {task_id: {"i": i} for i, task_id in enumerate(ids)})
        task = self.app.get_task_by_id(ids[-1])
        self.assertEqual((task.status, task.priority, task.queue, task.attempts), (TaskStatus.SCHEDULED, 3, "bulk", 0))
        self.assertEqual(task.run_at, task.created_at, "due at once: out of the index of delayed tasks")
        self.assertEqual(self.app.schedule_many("noop", iter(())), [])

    def test_bad_input_in_a_later_chunk_writes_nothing(self):
        for inputs in (_inputs(CHUNK * 4, bad_at=CHUNK * 3 + 5), list(_inputs(CHUNK * 4, bad_at=CHUNK * 4 - 1))):
            with self.subTest(kind=type(inputs).__name__):
                with self.assertRaisesRegex(TypeError, "object of type set cannot be stored"):
                    self.app.schedule_many("noop", inputs)
                self.assertEqual(self.count(), 0)
        self.assertEqual(len(self.app.schedule_many("noop", _inputs(CHUNK * 2))), CHUNK * 2, "the connection goes on")

    def test_database_error_in_a_later_chunk_rolls_back_the_earlier_ones(self):
        refused = CHUNK * 3 + 1
        if self.backend == "sqlite":
            self.db_execute("CREATE TRIGGER refuse BEFORE INSERT ON lilota_task WHEN NEW.input = '{\"i\":%d}' "
                            "BEGIN SELECT RAISE(ABORT, 'refused by test'); END" % refused)
        else:
            self.db_execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                            "$$ BEGIN RAISE EXCEPTION 'refused by test'; END $$")
            self.db_execute("CREATE TRIGGER refuse BEFORE INSERT ON lilota_task FOR EACH ROW "
                            "WHEN (NEW.input = '{\"i\": %d}'::jsonb) EXECUTE FUNCTION refuse()" % refused)
        with self.assertRaisesRegex(lilota.StorageError, "refused by test"):
            self.app.schedule_many("noop", _inputs(CHUNK * 4))
        self.assertEqual(self.count(), 0)

    def test_unique_keys_within_and_across_chunks(self):
        held = self.app.schedule("noop", {"before": True}, unique_key="k7")
        count = CHUNK * 3
        # k0 .. k149, each twice: the second of each pair comes a chunk and a half later.
        keys = [f"k{i % (count // 2)}" for i in range(count)]
        keys[5] = None
        ids = self.app.schedule_many("noop", _inputs(count), unique_keys=keys)
        self.assertEqual(len(ids), count)
        self.assertEqual(ids[7], held, "a key held before the call")
        self.assertEqual(ids[7 + count // 2], held)
        for i in range(count // 2, count):
            if i != 5 + count // 2 and i != 7 + count // 2:
                self.assertEqual(ids[i], ids[i - count // 2], f"the same key in another chunk ({i})")
        self.assertNotEqual(ids[5], ids[5 + count // 2], "a task without key is stored whatever the keys")
        stored = self.inputs_by_id()
        self.assertEqual(len(stored), 1 + count // 2)   # held, 149 keys of the call, and the keyless one
        self.assertEqual(stored[ids[0]], {"i": 0}, "the first input with a key holds it")
        self.assertEqual(stored[held], {"before": True})

    def test_keys_all_held_write_nothing_and_wake_nobody(self):
        if self.backend == "sqlite":
            self.skipTest("SQLite: the lock of the unique keys is a write, which moves data_version")
        keys = [f"k{i}" for i in range(CHUNK * 2)]
        first = self.app.schedule_many("noop", _inputs(CHUNK * 2), unique_keys=keys)
        woken = support.wake_signal(self)
        self.assertEqual(self.app.schedule_many("noop", _inputs(CHUNK * 2), unique_keys=keys), first)
        self.assertEqual(self.app.schedule_many("noop", _inputs(3), unique_keys=keys[:3]), first[:3])
        self.assertFalse(woken(0.3), "no task stored: no COPY, no NOTIFY")
        self.assertEqual(self.count(), CHUNK * 2)

    def test_race_of_calls_with_the_same_keys_in_other_orders(self):
        """2 processes of 4 threads, each one schedule_many() of the same 1,200 keys (two chunks of
        lilota's) in an order of its own: one task per key, and every caller gets its id."""
        outcomes = support.race_in_processes(_schedule_shuffled_keys, self.db_url)
        ids_per_key = {}
        for outcome in outcomes:
            for ids in outcome:
                for key, task_id in ids.items():
                    ids_per_key.setdefault(key, set()).add(task_id)
        self.assertEqual(len(ids_per_key), 1200)
        self.assertEqual({len(ids) for ids in ids_per_key.values()}, {1}, "every caller got the same id per key")
        self.assertEqual(self.count(), 1200)

    def test_unique_keys_one_per_input(self):
        for inputs, keys, message in ((_inputs(CHUNK + 1), ["a"] * CHUNK, "100 keys for more inputs"),
                                      (_inputs(CHUNK), [None] * (CHUNK + 1), "101 keys for 100 inputs"),
                                      (list(_inputs(3)), ["a", "b"], "2 keys for 3 inputs")):
            with self.subTest(message):
                with self.assertRaisesRegex(ValueError, message):
                    self.app.schedule_many("noop", inputs, unique_keys=keys)
        self.assertEqual(self.count(), 0)

    def test_dependencies_of_many_chunks(self):
        first = self.app.schedule("noop", {"first": True})
        ids = self.app.schedule_many("noop", _inputs(CHUNK * 2 + 3), depends_on=[first])
        self.assertEqual({self.app.get_task_by_id(i).status for i in (ids[0], ids[-1])}, {TaskStatus.WAITING})
        self.assertEqual(self.count("lilota_dependency"), CHUNK * 2 + 3)
        self.assertEqual(self.db_execute("SELECT COUNT(*) FROM lilota_dependency WHERE depends_on = ?",
                                         str(first))[0][0], CHUNK * 2 + 3)

    def test_texts_that_the_copy_format_escapes(self):
        odd = "tab\there, newline\nthere, a backslash \\ and \\N, a return\r, \u00e9\u4e2d\U0001f600"
        ids = self.app.schedule_many("noop", [{"text": odd, "i": i} for i in range(CHUNK + 1)] + [odd, None, 1.5e300],
                                     unique_keys=[f"{odd}{i}" for i in range(CHUNK + 4)])
        stored = self.inputs_by_id()
        self.assertEqual(stored[ids[CHUNK]], {"text": odd, "i": CHUNK})
        self.assertEqual([stored[i] for i in ids[-3:]], [odd, None, 1.5e300])
        self.assertEqual(self.app.get_task_by_id(ids[3]).unique_key, f"{odd}3")

    def test_a_notification_wakes_the_workers(self):
        woken = support.wake_signal(self)
        self.app.schedule_many("noop", _inputs(CHUNK * 3))
        self.assertTrue(woken(10), "what wakes idle workers after COPY / the INSERTs")


def _schedule_shuffled_keys(db_url):
    """One thread of the race: keys key0 ... key1199 shuffled (seeded by process and thread), one
    schedule_many(); {key: its id}."""
    import os
    import random
    import threading
    keys = [f"key{i}" for i in range(1200)]
    random.Random(os.getpid() * 1_000_003 + threading.get_ident()).shuffle(keys)
    ids = LilotaScheduler(db_url).schedule_many("noop", [{"key": key} for key in keys], unique_keys=keys)
    return {key: str(task_id) for key, task_id in zip(keys, ids)}


def _driver_connect(driver, test):
    """The application's own connection of ``driver`` (None: sqlite3) in its default, transactional
    mode, with a table of its own (orders)."""
    if test.backend == "sqlite":
        conn = sqlite3.connect(test.db_path)   # legacy transaction control: no transaction open yet
    else:
        import test_transactional
        try:
            conn = test_transactional._driver_connect(driver, test.db_url)
        except ImportError:
            test.skipTest(f"{driver} is not installed")
        cursor = conn.cursor()
        cursor.execute(f'SET search_path TO "{test.schema}"')
        conn.commit()
    test.addCleanup(conn.close)
    cursor = conn.cursor()
    key = "INTEGER PRIMARY KEY" if test.backend == "sqlite" else "SERIAL PRIMARY KEY"
    cursor.execute(f"CREATE TABLE IF NOT EXISTS orders (id {key}, item TEXT)")
    conn.commit()
    return conn


@support.on_every_backend
class BulkInTheCallersTransactionTests(BulkTestCase):
    """connection=: many chunks go into the application's transaction under a savepoint."""

    def drivers(self):
        return [None] if self.backend == "sqlite" else ["psycopg", "psycopg2", "pg8000"]

    def test_commit_rollback_and_a_bad_input_in_a_later_chunk(self):
        for driver in self.drivers():
            with self.subTest(driver=driver):
                conn = _driver_connect(driver, self)
                woken = support.wake_signal(self)
                ids = self.app.schedule_many("noop", _inputs(CHUNK * 3 + 1), connection=conn)
                self.assertIsNone(self.app.get_task_by_id(ids[0]), "not visible before the commit")
                self.assertFalse(woken(0.2), "nothing wakes the workers before the commit")
                conn.commit()
                self.assertTrue(woken(10))
                self.assertEqual(self.inputs_by_id(), {task_id: {"i": i} for i, task_id in enumerate(ids)})

                self.app.schedule_many("noop", _inputs(CHUNK * 2), connection=conn)
                self.app.schedule_many("noop", _inputs(CHUNK), connection=conn)   # one chunk: no savepoint
                conn.rollback()
                self.assertEqual(self.count(), CHUNK * 3 + 1)
                one = self.app.schedule_many("noop", _inputs(CHUNK), connection=conn)
                self.assertIsNone(self.app.get_task_by_id(one[0]))
                conn.commit()
                self.assertEqual(self.app.get_task_by_id(one[-1]).input, {"i": CHUNK - 1})
                self.db_execute("DELETE FROM lilota_task WHERE id IN (?, ?)", str(one[0]), str(one[-1]))
                self.assertEqual(self.count(), CHUNK * 4 - 1)

                # A bad input in the third chunk: what the call wrote is undone, the transaction
                # (and what the application wrote in it before and after) goes on.
                cursor = conn.cursor()
                cursor.execute("INSERT INTO orders (item) VALUES ('book')")
                with self.assertRaisesRegex(TypeError, "cannot be stored"):
                    self.app.schedule_many("noop", _inputs(CHUNK * 3, bad_at=CHUNK * 2 + 1), connection=conn)
                cursor = conn.cursor()
                cursor.execute("INSERT INTO orders (item) VALUES ('pen')")
                kept = self.app.schedule_many("noop", _inputs(CHUNK * 2), connection=conn)
                conn.commit()
                self.assertEqual((self.count("orders"), self.count()), (2, CHUNK * 6 - 1))
                self.assertEqual(self.app.get_task_by_id(kept[-1]).input, {"i": CHUNK * 2 - 1})
                self.db_execute("DELETE FROM lilota_task")
                self.db_execute("DELETE FROM orders")

    def test_sqlalchemy_connection(self):
        sqlalchemy, engine = support.sqlalchemy_engine(self)
        with engine.begin() as connection:
            ids = self.app.schedule_many("noop", _inputs(CHUNK * 2 + 1), connection=connection)
        self.assertEqual(self.count(), CHUNK * 2 + 1)
        with self.assertRaises(RuntimeError):
            with engine.begin() as connection:
                self.app.schedule_many("noop", _inputs(CHUNK * 2), connection=connection)
                raise RuntimeError("the order failed")
        with engine.begin() as connection:
            with self.assertRaises(TypeError):
                self.app.schedule_many("noop", _inputs(CHUNK * 2, bad_at=CHUNK + 1), connection=connection)
        self.assertEqual(self.count(), CHUNK * 2 + 1)
        self.assertEqual(self.app.get_task_by_id(ids[-1]).input, {"i": CHUNK * 2})

    def test_autocommit_connection_is_one_transaction(self):
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.db_path, isolation_level=None)
            self.addCleanup(conn.close)
        else:
            conn = _driver_connect("psycopg", self)
            conn.autocommit = True
        with self.assertRaises(TypeError):
            self.app.schedule_many("noop", _inputs(CHUNK * 3, bad_at=CHUNK * 3 - 1), connection=conn)
        self.assertEqual(self.count(), 0)
        ids = self.app.schedule_many("noop", _inputs(CHUNK * 2), connection=conn)
        self.assertEqual(self.app.get_task_by_id(ids[-1]).input, {"i": CHUNK * 2 - 1}, "committed at once")


class BulkOnEachPostgresDriverTests(BulkTestCase):
    """lilota's own connection through each driver: psycopg 3 streams one COPY, psycopg2 and pg8000
    send one COPY per chunk."""

    backend = "postgres"

    def test_each_driver(self):
        for driver in ("psycopg", "psycopg2", "pg8000"):
            with self.subTest(driver=driver):
                try:
                    importlib.import_module(driver)
                except ImportError:
                    if support.IN_CI and driver == "psycopg":
                        raise
                    continue
                url = re.sub(r"^postgres(ql)?(\+\w+)?://", f"postgresql+{driver}://", self.db_url)
                app = LilotaScheduler(url)
                app.storage.ensure_ready()
                self.assertEqual(app.storage.dialect.driver, driver)
                ids = app.schedule_many("noop", _inputs(CHUNK * 3 + 2),
                                        unique_keys=[f"{driver}:{i % 150}" for i in range(CHUNK * 3 + 2)])
                self.assertEqual(ids[150:], ids[:CHUNK * 3 + 2 - 150])
                with self.assertRaises(TypeError):
                    app.schedule_many("noop", _inputs(CHUNK * 3, bad_at=CHUNK * 2 + 7))
                stored = {task.id: task.input for task in app.list_tasks(limit=None)
                          if (task.unique_key or "").startswith(driver + ":")}
                self.assertEqual(stored, {task_id: {"i": i} for i, task_id in enumerate(ids[:150])})
                app.storage.close()


if __name__ == "__main__":
    unittest.main()
