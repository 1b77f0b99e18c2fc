"""Storage faults on the supervisor's side (the API's side is in test_storage.py): a read-only file,
a directory without write permission, a corrupt file and a full disk, at start() and while workers
run. Each gives a clear error, starts no crash loop, and loses nothing already stored."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import unittest
from unittest import mock

from support import ROOT, child_pids, process_alive, wait_until
from test_processes import WorkerTestCase

import lilota
from lilota import (CorruptDatabaseError, DatabaseFullError, DatabaseUnavailableError, LilotaScheduler, LilotaWorker,
                    TaskStatus)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

#: Starts a Lilota with 2 workers and reports: the outcome of start(), the worker processes it left.
START_APP = """
import json, multiprocessing, sys
sys.path.insert(0, {root!r})
import lilota

if __name__ == "__main__":
    app = lilota.Lilota(sys.argv[1], script_path=sys.argv[2], number_of_workers=2)
    try:
        app.start()
        outcome = "started"
    except lilota.LilotaError as exc:
        outcome = "%s: %s" % (type(exc).__name__, exc)
    print(json.dumps({{"outcome": outcome, "children": len(multiprocessing.active_children()),
                      "running": app.is_running, "failed": app.has_failed()}}))
    app.stop(timeout=5)
"""

#: Worker-script lines that give every connection of the worker process the page limit written in
#: max_pages (when the file exists): the same full "disk" as the test process sees. And a task
#: whose output takes room.
FULL_DISK_TASKS = """
import sqlite3
_connect = sqlite3.connect

def _capped(*args, **kwargs):
    conn = _connect(*args, **kwargs)
    limit = os.path.join(os.path.dirname(os.path.abspath(__file__)), "max_pages")
    if os.path.exists(limit):
        with open(limit) as f:
            conn.execute("PRAGMA max_page_count = %d" % int(f.read()))
    return conn

sqlite3.connect = _capped

@worker.register("grow")
def grow(data):
    return {"n": data["n"], "pad": "z" * data["size"]}
"""


class StorageFaultTestCase(WorkerTestCase):

    def setUp(self):
        super().setUp()
        self.start_app = self.write("start_app.py", START_APP.format(root=ROOT))

    def start_elsewhere(self, url, script, without_root_powers=False):
        """Run START_APP in a new process (one that file modes bind, if asked) and return its report."""
        command = [sys.executable, self.start_app, url, script]
        if without_root_powers and IS_ROOT:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                self.skipTest("running as root without util-linux's setpriv: cannot make file modes bind")
            command = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"] + command
        result = subprocess.run(command, cwd=self.dir, capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, PYTHONPATH=ROOT))
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout.splitlines()[-1])

    def stored(self, count=3):
        """A database holding ``count`` queued tasks; returns their ids."""
        scheduler = LilotaScheduler(self.db_url)
        ids = [scheduler.schedule("echo", {"n": i}) for i in range(count)]
        self._close_storages()
        return ids

    def check_all_run(self, ids):
        app = self.start_lilota(self.script(), 1)
        for n, task_id in enumerate(ids):
            task = app.wait(task_id, timeout=30)
            self.assertEqual((task.status, task.output), (TaskStatus.COMPLETED, {"n": n}))


class FaultAtStartTest(StorageFaultTestCase):

    def check_refused(self, report, error, *fragments):
        self.assertEqual(report["outcome"].split(":")[0], error, report)
        for fragment in fragments:
            self.assertIn(fragment, report["outcome"])
        self.assertEqual(report["children"], 0, "no worker process may start")
        self.assertFalse(report["running"])
        self.assertFalse(report["failed"], "start() raised; there is nothing to restart")

    def test_read_only_file(self):
        ids = self.stored()
        os.chmod(self.db_path, 0o400)
        self.addCleanup(os.chmod, self.db_path, 0o600)
        self.check_refused(self.start_elsewhere(self.db_url, self.script(), without_root_powers=True),
                           "ReadOnlyDatabaseError", "read-only", self.db_path)
        os.chmod(self.db_path, 0o600)
        self.check_all_run(ids)

    def test_directory_without_write_permission(self):
        ids = self.stored()
        script = self.script()
        os.chmod(self.dir, 0o500)
        self.addCleanup(os.chmod, self.dir, 0o700)
        self.check_refused(self.start_elsewhere(self.db_url, script, without_root_powers=True),
                           "ReadOnlyDatabaseError", "read-only")
        self.check_refused(self.start_elsewhere("sqlite:///" + self.path("new.db"), script, without_root_powers=True),
                           "ReadOnlyDatabaseError", "cannot create", self.dir)
        os.chmod(self.dir, 0o700)
        self.assertFalse(os.path.exists(self.path("new.db")))
        self.check_all_run(ids)

    def test_corrupt_file(self):
        garbage = b"this is not a database, just some garbage bytes\x00\xff" * 300
        with open(self.db_path, "wb") as f:
            f.write(garbage)
        children = set(child_pids())
        app = lilota.Lilota(self.db_url, script_path=self.script(), number_of_workers=2)
        with self.assertRaises(CorruptDatabaseError) as cm:
            app.start()
        self.assertIn(self.db_path, str(cm.exception))
        self.assertFalse(app.is_running)
        self.assertFalse(app.has_failed())
        self.assertEqual(set(child_pids()) - children, set(), "no worker process may start")
        with self.assertRaises(CorruptDatabaseError):
            app.start()      # again: the same clear error, still no worker
        self.assertEqual(set(child_pids()) - children, set())
        app.stop()
        with open(self.db_path, "rb") as f:
            self.assertEqual(f.read(), garbage, "lilota must not write over a file it cannot read")


class FullDiskWhileRunningTest(StorageFaultTestCase):

    def test_full_database_under_running_workers(self):
        """A worker whose claim met a full database died of the DatabaseFullError and was restarted,
        to die again at its next claim: a crash loop for as long as the disk stayed full."""
        script = self.script(name="full_disk_worker.py", more_tasks=FULL_DISK_TASKS)
        # Old finished tasks take most of the file; then the file may not grow any more.
        scheduler = LilotaScheduler(self.db_url)
        worker = LilotaWorker(self.db_url)
        worker.register("echo")(lambda data: data)
        scheduler.schedule_many("echo", [{"pad": "x" * 3000}] * 150)
        worker.run_pending()
        queued = scheduler.schedule_many("grow", [{"n": n, "size": 40_000} for n in range(4)])
        with scheduler.storage._guard as conn:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
        self._close_storages()
        with open(self.path("max_pages"), "w") as f:
            f.write(str(pages))
        real_connect = sqlite3.connect

        def capped(*args, **kwargs):
            conn = real_connect(*args, **kwargs)
            conn.execute(f"PRAGMA max_page_count = {pages}")
            return conn
        patcher = mock.patch.object(lilota.sqlite3, "connect", capped)
        patcher.start()
        self.addCleanup(patcher.stop)

        app = self.start_lilota(script, 2, restart_delay=0.05, heartbeat_interval=0.2)
        with self.assertRaises(DatabaseFullError) as cm:
            app.schedule("grow", {"n": 9, "pad": "y" * 50_000})
        self.assertIn("full", str(cm.exception))
        # The workers claim the queued tasks and cannot store their outputs: they wait, and live.
        wait_until(lambda: self.query("SELECT COUNT(*) FROM lilota_task WHERE status = 'running'") == [(2,)], 30,
                   message="both workers to hold a task whose output does not fit")
        self.assertEqual(self.starts(), 2)
        self.assertFalse(app.has_failed(), app.error)

        # Making room (here by deleting old tasks) lets everything through; nothing was lost.
        self.assertEqual(app.cleanup(older_than=0)["tasks"], 150)
        for task_id in queued:
            task = app.wait(task_id, timeout=60)
            self.assertEqual(task.status, TaskStatus.COMPLETED, task.error)
            self.assertEqual(len(task.output["pad"]), 40_000)
            self.assertEqual(task.attempts, 1)
        self.assertEqual(app.wait(app.schedule("grow", {"n": 5, "size": 10}), timeout=30).status, TaskStatus.COMPLETED)
        self.assertEqual(self.starts(), 2, "no worker process died")
        self.assertEqual([n[2] for n in self.worker_nodes()], ["running", "running"])
        self.assertFalse(app.has_failed(), app.error)


#: Worker-script lines: while the file "claim-fails" exists, every claim of this worker process fails
#: with the StorageError named in it (as a full disk fails the claim's write to the WAL).
FAILING_CLAIMS = """
import lilota
_claim = worker.storage.claim

def _failing_claim(*args, **kwargs):
    flag = os.path.join(HERE, "claim-fails")
    if os.path.exists(flag):
        with open(flag) as f:
            error = f.read().strip()
        fd = os.open(os.path.join(HERE, "failed-claims.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, ("%s %d\\n" % (error, os.getpid())).encode())
        os.close(fd)
        raise getattr(lilota, error)("simulated: database or disk is full")
    return _claim(*args, **kwargs)

worker.storage.claim = _failing_claim
"""


class WorkerLoopStorageErrorTest(StorageFaultTestCase):

    def failed_claims(self, error):
        """Pids of the worker processes whose claims failed with ``error``, one per failure."""
        try:
            with open(self.path("failed-claims.log")) as f:
                return [int(pid) for name, pid in (line.split() for line in f) if name == error]
        except FileNotFoundError:
            return []

    def test_worker_waits_out_storage_errors_of_its_claim(self):
        """Only DatabaseBusyError was waited out by the worker loop: any other StorageError from a
        claim (SQLITE_FULL also comes from appending to the WAL on a full disk, an I/O error) ended
        the worker process, and each replacement died the same way: a crash loop."""
        script = self.script(name="failing_claims_worker.py", more_tasks=FAILING_CLAIMS)
        app = self.start_lilota(script, 1, restart_delay=0.05)
        self.assertEqual(app.wait(app.schedule("echo", {"n": 0}), timeout=30).status, TaskStatus.COMPLETED)
        for error in ("DatabaseFullError", "DatabaseUnavailableError"):
            with self.subTest(error=error):
                with open(self.path("claim-fails"), "w") as f:
                    f.write(error)
                waiting = app.schedule("echo", {"n": 1})    # rings the idle worker: it claims, and fails
                wait_until(lambda: len(self.failed_claims(error)) >= 3, 30, message="three failed claims")
                self.assertEqual(set(self.failed_claims(error)), {app._handles[0].process.pid},
                                 "the same worker process failed them all")
                self.assertEqual(self.starts(), 1)
                self.assertEqual(app.get_task_by_id(waiting).status, TaskStatus.SCHEDULED)
                os.unlink(self.path("claim-fails"))
                task = app.wait(waiting, timeout=30)
                self.assertEqual((task.status, task.attempts), (TaskStatus.COMPLETED, 1))
        self.assertEqual(self.starts(), 1, "the worker process lived through it")
        self.assertEqual([n[2] for n in self.worker_nodes()], ["running"])
        self.assertFalse(app.has_failed(), app.error)


class DeletedDatabaseTest(StorageFaultTestCase):

    def test_database_deleted_under_running_workers(self):
        """lilota went on with the file it had open after it was deleted: the application and its
        workers shared a database no other process could reach (one starting afterwards created a
        new, empty one at the path, and the tasks it stored there never ran), and all they stored
        was gone when they exited. Nobody was told."""
        app = self.start_lilota(self.script(), 2, heartbeat_interval=0.2)
        self.wait_workers_running(2)   # both running before the file goes: none is restarted after
        api = LilotaScheduler(self.db_url + "?timeout=29")   # a connection of its own, as in another process
        done = api.schedule("echo", {"n": 0})
        self.assertEqual(api.wait(done, timeout=30).status, TaskStatus.COMPLETED)
        workers = [h.process.pid for h in app._handles]
        for suffix in ("", "-wal", "-shm"):
            os.unlink(self.db_path + suffix)

        # The supervisor: a clear fatal error; its workers are stopped and not restarted.
        self.assertTrue(app.wait_for_failure(10), "the supervisor must notice")
        self.assertIn("deleted or replaced", app.error)
        self.assertIn(self.db_path, app.error)
        for pid in workers:
            wait_until(lambda: not process_alive(pid), 10, message=f"worker {pid} to stop")
        self.assertEqual(self.starts(), 2)

        # The API: a clear error once lilota notices (within a second); then the file at the path.
        def error():
            try:
                api.get_task_by_id(done)
            except DatabaseUnavailableError as exc:
                return str(exc)
            return None
        message = wait_until(error, 10, interval=0.05, message="the API to report the deleted file")
        self.assertIn("deleted or replaced", message)
        self.assertIn(self.db_path, message)
        self.assertIsNone(api.get_task_by_id(done), "a new, empty database")

        # Started again, lilota uses the new file: what is stored from now on runs.
        later = api.schedule("echo", {"n": 1})
        app.start()
        self.assertEqual(app.wait(later, timeout=30).output, {"n": 1})
        self.assertFalse(app.has_failed(), app.error)


if __name__ == "__main__":
    unittest.main()
