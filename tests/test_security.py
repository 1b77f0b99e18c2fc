"""Security: rows crafted straight into the database, SQL built only from bound parameters, the
file modes of the database and its companions, and keep_input=False leaving no copy of the input
in the file's bytes."""

import json
import os
import sqlite3
import unittest
import uuid
from dataclasses import dataclass
from unittest import mock

try:
    from .support import ROOT, TempDirTestCase, wait_until
    from .test_processes import WorkerTestCase
except ImportError:  # run from inside tests/
    from support import ROOT, TempDirTestCase, wait_until
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

    def execute(self, sql, *params):
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def plant(self, scheduler, name="echo"):
        """Schedule one task per crafted payload and overwrite the column; return {id: payload}."""
        planted = {}
        for column, value, valid in crafted_payloads(self.dir):
            # Queued for later, then made due in the statement that plants the value: no worker
            # can take the harmless version first.
            task_id = scheduler.schedule(name, {"harmless": True}, delay=3600)
            self.execute(f"UPDATE lilota_task SET {column} = ?, run_at = created_at WHERE id = ?", value, str(task_id))
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
                status, error = self.execute("SELECT status, error FROM lilota_task WHERE id = ?", str(task_id))[0]
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
        self.assertEqual(self.execute("SELECT COUNT(*) FROM lilota_task WHERE status = 'running'"), [(0,)])

    def test_crafted_rows_do_not_kill_worker_processes(self):
        scheduler = LilotaScheduler(self.db_url)
        scheduler.schedule("echo", None)      # creates the tables before the workers start
        app = self.start_lilota(self.script(), 2, restart_delay=0.05)
        self.wait_workers_running(2)
        planted = self.plant(app)
        goods = [app.schedule("echo", {"n": i}) for i in range(20)]
        for task_id in goods:
            self.assertEqual(app.wait(task_id, timeout=20).status, TaskStatus.COMPLETED)
        wait_until(lambda: self.execute("SELECT COUNT(*) FROM lilota_task WHERE status IN "
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
        self.execute("UPDATE lilota_task SET input = ? WHERE id = ?",
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


if __name__ == "__main__":
    unittest.main()
