"""Security: rows crafted straight into the database, SQL built only from bound parameters, the
file modes of the database and its companions, and keep_input=False leaving no copy of the input
in the file's bytes."""

import json
import os
import sqlite3
import stat
import unittest
import uuid
from dataclasses import dataclass
from unittest import mock

from support import TempDirTestCase, wait_until
from test_processes import WorkerTestCase

import lilota
from lilota import CorruptDatabaseError, LilotaScheduler, LilotaWorker, TaskStatus

CANARY = "canary-was-written"

#: Payloads an attacker with write access to the table might store, hoping a worker runs them:
#: pickles (as text and as a BLOB), jsonpickle/YAML-style type tags, JSON nested 100,000 deep, an id
#: that is not a UUID. Each is (column, stored value, True when it is valid JSON that a task may receive as plain data).
def crafted_payloads(directory):
    canary = os.path.join(directory, CANARY)
    pickled = (b"cos\nsystem\n(S'touch " + canary.encode() + b"'\ntR.")
    return [
        ("input", pickled.decode(), False),
        ("input", pickled, False),
        ("input", b"\x80\x04\x95\x00", False),
        ("input", "{not json", False),
        ("input", "[" * 100_000 + "]" * 100_000, False),
        ("input", json.dumps({"py/object": "os.system", "py/reduce": [{"py/function": "os.system"},
                                                                    {"py/tuple": ["touch " + canary]}],
                              "__class__": "subprocess.Popen", "!!python/object/apply:os.system": ["touch " + canary],
                              "__reduce__": ["os.system", ["touch " + canary]]}), True),
        ("error", "{broken", False),
        ("output", "[1,", False),
        ("id", "not-a-uuid'); --", False),
    ]


class MaliciousRowTestCase(WorkerTestCase):

    def plant(self, scheduler, name="echo"):
        """Schedule one task per crafted payload and overwrite the column; return {id: payload}."""
        planted = {}
        for column, value, valid in crafted_payloads(self.dir):
            # Queued for later, then made due in the statement that plants the value: no worker
            # can take the harmless version first.
            task_id = scheduler.schedule(name, {"harmless": True}, delay=3600)
            self.db_execute(f"UPDATE lilota_task SET {column} = ?, run_at = created_at WHERE id = ?", value, str(task_id))
            planted[value if column == "id" else task_id] = (column, value, valid)
        return planted

    def check_outcomes(self, scheduler, planted):
        for task_id, (column, value, valid) in planted.items():
            with self.subTest(column=column, value=repr(value)[:40]):
                if valid:
                    task = scheduler.get_task_by_id(task_id)
                    self.assertEqual(task.status, TaskStatus.COMPLETED, task.error)
                    self.assertEqual(json.dumps(task.output, allow_nan=True), json.dumps(json.loads(value)))
                    continue
                status, error = self.db_execute("SELECT status, error FROM lilota_task WHERE id = ?", str(task_id))[0]
                self.assertEqual(status, "failed")
                error = json.loads(error)
                self.assertEqual(error["type"], "CorruptDatabaseError")
                self.assertIn(str(task_id), error["message"])
                self.assertIn("cannot be read", error["message"])
                if column in ("input", "output"):
                    # The crafted value is kept as evidence; reading the task says clearly why it fails.
                    with self.assertRaises(CorruptDatabaseError) as cm:
                        scheduler.get_task_by_id(task_id)
                    self.assertIn(column, str(cm.exception))
        self.assertFalse(os.path.exists(self.path(CANARY)), "a stored row ran code")


class MaliciousRowTest(MaliciousRowTestCase):

    def test_crafted_rows_fail_their_task_and_nothing_else_in_process(self):
        """A row a worker could not decode escaped the claim as an exception: run_pending() raised,
        a worker process died, and the task stayed running for recovery to hand it to the next."""
        scheduler = LilotaScheduler(self.db_url)
        worker = LilotaWorker(self.db_url)

        @worker.register("echo")
        def echo(data):
            return data

        good_before = scheduler.schedule("echo", {"n": 1})
        planted = self.plant(scheduler)
        good_after = scheduler.schedule("echo", {"n": 2})
        done = worker.run_pending()
        self.assertEqual(len(done), 2 + sum(valid for _, _, valid in planted.values()))
        for task_id, n in ((good_before, 1), (good_after, 2)):
            self.assertEqual(scheduler.get_task_by_id(task_id).output, {"n": n})
        self.check_outcomes(scheduler, planted)
        self.assertEqual(self.db_execute("SELECT COUNT(*) FROM lilota_task WHERE status = 'running'"), [(0,)])

    def test_crafted_rows_do_not_kill_worker_processes(self):
        scheduler = LilotaScheduler(self.db_url)
        scheduler.schedule("echo", None)      # creates the tables before the workers start
        app = self.start_lilota(self.script(), 2, restart_delay=0.05)
        self.wait_workers_running(2)
        planted = self.plant(app)
        goods = [app.schedule("echo", {"n": i}) for i in range(20)]
        for task_id in goods:
            self.assertEqual(app.wait(task_id, timeout=20).status, TaskStatus.COMPLETED)
        wait_until(lambda: self.db_execute("SELECT COUNT(*) FROM lilota_task WHERE status IN "
                                        "('scheduled', 'running')") == [(0,)], 30, message="every task to end")
        self.check_outcomes(app, planted)
        self.assertEqual(self.starts(), 2, "no worker process died")
        self.assertEqual([n[2] for n in self.worker_nodes()], ["running", "running"])
        self.assertFalse(app.has_failed())

    def test_crafted_input_reaches_a_model_as_data_only(self):
        """A crafted input for a task with an input model is handed to the model's constructor as
        keyword data: unexpected keys fail the task with a TypeError; no key names code to run."""
        scheduler = LilotaScheduler(self.db_url)
        worker = LilotaWorker(self.db_url)

        @dataclass
        class AddInput:
            a: int
            b: int

        @worker.register("add", input_model=AddInput)
        def add(data: AddInput):
            return {"sum": data.a + data.b}

        task_id = scheduler.schedule("add", AddInput(a=1, b=2))
        self.db_execute("UPDATE lilota_task SET input = ? WHERE id = ?",
                     json.dumps({"a": 1, "b": 2, "__class__": "os.system", "__init__": "touch " + CANARY}),
                     str(task_id))
        [task] = worker.run_pending()
        self.assertEqual(task.status, TaskStatus.FAILED)
        self.assertEqual(task.error["type"], "TypeError")
        self.assertIn("__class__", task.error["message"])
        self.assertFalse(os.path.exists(self.path(CANARY)))


class KeepInputLeavesNoCopyTest(TempDirTestCase):

    def test_no_copy_of_the_input_in_the_file_once_finished(self):
        """keep_input=False set the column to NULL, but SQLite keeps deleted content in the page it
        was on and in freed overflow pages unless secure_delete is on, which depends on how SQLite
        was built (off in SQLite's own builds, on in Debian's): a large input stayed in the file."""
        real_connect = sqlite3.connect

        def connect_like_a_default_build(*args, **kwargs):
            conn = real_connect(*args, **kwargs)
            conn.execute("PRAGMA secure_delete = OFF")
            return conn

        token = uuid.uuid4().hex
        small, big = f"SECRET-SMALL-{token}", f"SECRET-BIG-{token}-" + "z" * 30_000   # big: overflow pages
        kept = f"KEPT-{token}"
        with mock.patch.object(lilota.sqlite3, "connect", connect_like_a_default_build):
            scheduler = LilotaScheduler(self.db_url)
            worker = LilotaWorker(self.db_url, retry_delay=0)

            @worker.register("secret", keep_input=False, max_attempts=2)
            def secret(data, ctx: lilota.TaskContext):
                if data.get("fail") == "always" or (data.get("fail") == "first" and ctx.attempt == 1):
                    raise RuntimeError("this attempt fails")
                return {"length": len(data["s"])}

            @worker.register("kept")
            def kept_task(data):
                return {"length": len(data["s"])}

            ids = [scheduler.schedule("secret", {"s": s, "fail": fail})
                   for s in (small, big) for fail in (None, "first", "always")]
            ids += scheduler.schedule_many("secret", [{"s": small}, {"s": big}])
            kept_id = scheduler.schedule("kept", {"s": kept})
            while worker.run_pending():
                pass      # the retries fall due at once (retry_delay=0)
            for task_id in ids:
                task = scheduler.get_task_by_id(task_id)
                self.assertTrue(task.is_finished, task)
                self.assertIsNone(task.input)
            self.assertEqual(scheduler.get_task_by_id(kept_id).input, {"s": kept})

        # A checkpoint moves every page to the database file and empties the WAL.
        conn = real_connect(self.db_path, isolation_level=None)
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            self.assertEqual(busy, 0)
            self.assertEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        finally:
            conn.close()
        data = b""
        for suffix in ("", "-wal", "-journal"):
            if os.path.exists(self.db_path + suffix):
                with open(self.db_path + suffix, "rb") as f:
                    data += f.read()
        self.assertTrue(kept.encode() in data, "the scan finds an input that is kept")
        for marker in (f"SECRET-SMALL-{token}".encode(), f"SECRET-BIG-{token}".encode(), b"z" * 1000):
            self.assertEqual(data.find(marker), -1, f"{marker[:20]!r}... is still in the file's bytes")


MARK = "Zq7HOSTILE"   # in every hostile value below, so that it can be looked for in the SQL text


class ParameterisedSqlTest(TempDirTestCase):
    """Every value reaches SQLite as a bound parameter: no name, input, id, node name or error ever
    appears in the text of a statement. (lilota has no configurable table prefix: the table names
    are fixed, so there is no identifier to validate.)"""

    def test_hostile_values_never_enter_the_sql_text(self):
        statements = []

        class Recording(sqlite3.Connection):
            def execute(self, sql, *args):
                statements.append(sql)
                return super().execute(sql, *args)

            def executemany(self, sql, *args):
                statements.append(sql)
                return super().executemany(sql, *args)

        real_connect = sqlite3.connect

        def recording_connect(*args, **kwargs):
            return real_connect(*args, factory=Recording, **kwargs)

        directory = self.path(f"{MARK}'; DROP TABLE lilota_task; --")
        os.mkdir(directory)
        url = "sqlite:///" + os.path.join(directory, f'{MARK} "quoted" name.db')
        names = [f"{MARK}' OR '1'='1", f'{MARK}"; DROP TABLE lilota_task; --', f"{MARK} %s ? :n0 $1 @p",
                 f"{MARK}') ; DELETE FROM lilota_node; --", f"{MARK}\\' --"]
        payload = {f"{MARK} key'); --": f"{MARK} value'); DELETE FROM lilota_task; --", "n": [1, f"{MARK}\"'"]}
        with mock.patch.object(lilota.sqlite3, "connect", recording_connect):
            app = lilota.Lilota.scheduler(url, name=f"{MARK}'); DROP TABLE lilota_node; --")
            app.start()
            try:
                worker = LilotaWorker(url, retry_delay=0)
                for i, name in enumerate(names):
                    worker.register(name)(self._task(i))
                ids = [app.schedule(name, payload) for name in names]
                ids += app.schedule_many(names[0], [payload, {MARK: MARK}])
                later = app.schedule(names[1], payload, delay=3600)
                done = worker.run_pending()
                self.assertEqual(len(done), len(ids))
                self.assertTrue(app.cancel(later))
                failed = [t.id for t in done if t.status == TaskStatus.FAILED]
                self.assertTrue(failed)
                self.assertTrue(app.retry(failed[0]))
                worker.run_pending()
                for task_id in ids:
                    self.assertTrue(app.wait(task_id, timeout=5).is_finished)
                self.assertEqual({app.get_task_by_id(i).name for i in ids}, set(names))
                self.assertEqual(app.get_task_by_id(ids[0]).input, payload)
                self.assertIn(MARK, app.get_task_by_id(failed[0]).error["message"])
                self.assertTrue(any(MARK in (n.name or "") for n in app.get_all_nodes()))
                for hostile_id in (f"{MARK}' OR '1'='1", f"{ids[0]}' OR '1'='1", f"{ids[0]}; --"):
                    with self.assertRaises(ValueError):
                        app.get_task_by_id(hostile_id)
                    with self.assertRaises(ValueError):
                        app.cancel(hostile_id)
                list_tasks = getattr(app, "list_tasks", None)   # the command line's query, where present
                if list_tasks is not None:
                    self.assertEqual(len(list_tasks(name=names[2])), 1)
                    with self.assertRaises(ValueError):
                        list_tasks(status=f"{MARK}' OR '1'='1")
                self.assertEqual(app.cleanup(older_than=0)["tasks"], len(ids) + 1)
            finally:
                app.stop()
        self.assertGreater(len(statements), 20)
        leaked = [sql for sql in statements if MARK in sql]
        self.assertEqual(leaked, [], "a value was written into SQL text")
        conn = real_connect(os.path.join(directory, f'{MARK} "quoted" name.db'))
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            self.assertLessEqual({"lilota_task", "lilota_node", "lilota_meta"}, tables)
            self.assertEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        finally:
            conn.close()

    @staticmethod
    def _task(i):
        def run(data):
            if i == 3:
                raise RuntimeError(f"{MARK}'); DROP TABLE lilota_task; -- failed")
            return {"echo": data}
        return run


class FileModeTest(TempDirTestCase):
    """The database lilota creates, and SQLite's -wal and -shm beside it, are readable by their owner
    only, whatever the umask of the process that creates them."""

    def modes(self, path):
        return {suffix: stat.S_IMODE(os.stat(path + suffix).st_mode) for suffix in ("", "-wal", "-shm")}

    def test_created_by_the_application_under_umask_000(self):
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        LilotaScheduler(self.db_url).schedule("echo", {"secret": 1})   # the connection stays open
        self.assertEqual(self.modes(self.db_path), {"": 0o600, "-wal": 0o600, "-shm": 0o600})

    def test_created_by_a_standalone_worker_under_umask_000(self):
        path = self.path("worker-made.db")
        code = (f"import os, stat, json, sys\n"
                f"os.umask(0)\n"
                f"from lilota import LilotaWorker\n"
                f"worker = LilotaWorker('sqlite:///{path}')\n"
                f"worker.run_pending()\n"
                f"print(json.dumps({{s: stat.S_IMODE(os.stat({path!r} + s).st_mode) for s in ('', '-wal', '-shm')}}))\n")
        result = self.run_python("-c", code, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), {"": 0o600, "-wal": 0o600, "-shm": 0o600})


if __name__ == "__main__":
    unittest.main()
