"""Workers and supervisors under concurrency and partial failure: a worker declared dead while
alive is fenced off, stop() keeps the leases of running tasks, outcome writes are retried while
the database is locked, the supervisor survives database errors, workers start with forkserver
and fork, supervised workers ignore SIGTERM, retry() refuses a task whose input was deleted,
relative SQLite URLs are fixed at construction, cancel wins over retry, progress is written by the
owning node only, dead pids and expired leases are detected, and a completion claims the next
task in its commit."""

import json
import logging
import multiprocessing
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import unittest
import unittest.mock
import uuid
import warnings

from support import ROOT, TempDirTestCase, process_alive, wait_until, on_every_backend, sqlite_only
from test_processes import WorkerTestCase

import lilota
from lilota import Lilota, LilotaScheduler, LilotaWorker, NodeStatus, NodeType, TaskContext

#: A task that logs "start <pid> <attempt>" and, after sleeping, "done <pid> <attempt>" to runs.log
#: (O_APPEND: one line per write, whichever process writes). data: "seconds" (a number, or a list
#: with one per attempt), and "until": a file in the test directory to wait for after sleeping.
LONG_TASK_BODY = """
HERE = os.path.dirname(os.path.abspath(__file__))

def append(text):
    fd = os.open(os.path.join(HERE, "runs.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\\n").encode())
    finally:
        os.close(fd)

@worker.register("long")
def long(data, ctx: TaskContext):
    append("start %d %d" % (os.getpid(), ctx.attempt))
    seconds = data.get("seconds", 0)
    time.sleep(seconds[ctx.attempt - 1] if isinstance(seconds, list) else seconds)
    while data.get("until") and not os.path.exists(os.path.join(HERE, data["until"])):
        time.sleep(0.01)
    append("done %d %d" % (os.getpid(), ctx.attempt))
    return {"pid": os.getpid(), "attempt": ctx.attempt}
"""

#: Another process that recovers lost nodes, as a second application would, until a file appears.
REAPER = """
import json, os, sys, time
sys.path.insert(0, {root!r})
import lilota
from lilota import Lilota

storage = Lilota.scheduler({db_url!r}).storage
rounds = 0
while True:
    lilota._recover_lost_nodes(storage, 0.05, 0.1)
    rounds += 1
    if rounds == 1:
        open({ready!r}, "w").close()
    if os.path.exists({stop!r}):
        break
    time.sleep(0.05)   # the pace of the reaper's rounds
print(json.dumps({{"rounds": rounds}}))
"""


class ResilienceTestCase(WorkerTestCase):

    def execute(self, sql, *params):
        """Run one statement on a connection of the test's own (autocommit) and return its rows."""
        return self.db_execute(sql, *params)

    def long_script(self):
        return self.worker_script(LONG_TASK_BODY, name="long_script.py")

    def runs(self):
        """The lines of runs.log as (event, pid, attempt)."""
        try:
            with open(self.path("runs.log")) as f:
                return [(event, int(pid), int(attempt))
                        for event, pid, attempt in (line.split() for line in f if line.strip())]
        except FileNotFoundError:
            return []

    def node_status(self, node_id):
        rows = self.query("SELECT status FROM lilota_node WHERE id = ?", str(node_id))
        return rows[0][0] if rows else None


# --- 1. fencing ------------------------------------------------------------------------------------

@on_every_backend
class FenceTest(ResilienceTestCase):

    def test_worker_declared_dead_while_alive_is_replaced_and_its_run_never_completes(self):
        app = self.start_lilota(self.long_script(), 1, heartbeat_interval=0.2, retry_delay=0.05)
        # The first run lasts far longer than the supervisor may take to notice the fence (it is
        # killed then, so this costs no time): a "done" of it means it was not stopped. The second
        # run is short.
        task_id = app.schedule("long", {"seconds": [20, 0.2]}, max_attempts=2)
        running = self.wait_status(app, task_id, "running")
        wait_until(lambda: [r for r in self.runs() if r[0] == "start"], 20, message="the first run to start")

        # Another process declares the (alive, busy) worker dead and recovers its task. The
        # supervisor shares this process's storage: holding its lock keeps it from heartbeating
        # between the two steps, as a paused application would.
        storage = lilota.Storage.for_url(self.db_url)
        with storage._lock:
            self.execute("UPDATE lilota_node SET status = 'dead' WHERE id = ?", str(running.locked_by))
            lilota._recover_lost_nodes(storage, 0.05, 0.1)
            requeued = storage.get_task(str(task_id))
        self.assertEqual(requeued.status, "scheduled")
        self.assertEqual(requeued.attempts, 1)
        self.assertIsNone(requeued.locked_by)      # a requeued task is unlocked
        self.assertEqual(requeued.error["type"], "WorkerDiedError")

        # The supervisor notices its worker was fenced and replaces it: the first run is cut short.
        wait_until(lambda: not process_alive(running.pid), 10, message="the fenced worker to be killed")
        task = app.wait(task_id, timeout=20)
        self.assertEqual(task.status, "completed", task.error)
        self.assertEqual(task.attempts, 2)
        self.assertEqual(task.output["attempt"], 2)
        self.assertNotEqual(task.pid, running.pid)
        self.assertEqual(task.output["pid"], task.pid)

        runs = self.runs()
        self.assertEqual([r for r in runs if r[0] == "start"], [("start", running.pid, 1), ("start", task.pid, 2)])
        self.assertEqual([r for r in runs if r[0] == "done"], [("done", task.pid, 2)])
        self.assertFalse(app.has_failed())
        self.assertEqual(len(self.worker_nodes()), 2)
        self.assertEqual(self.node_status(running.locked_by), "stopped")


# --- 2. leases during stop -------------------------------------------------------------------------

@on_every_backend
class LeaseDuringStopTest(ResilienceTestCase):

    def test_stop_keeps_the_leases_while_running_tasks_finish(self):
        # node_timeout leaves the supervisor 1.8 s between two heartbeats before a reaper may fence
        # its worker: enough on a loaded machine. The task runs until the test releases it, which
        # it does once stop() has been waiting for it for well over node_timeout.
        node_timeout = 2.0
        app = self.start_lilota(self.long_script(), 1, node_timeout=node_timeout, heartbeat_interval=0.2,
                                stop_timeout=60)
        task_id = app.schedule("long", {"until": "release"}, max_attempts=2)
        running = self.wait_status(app, task_id, "running")

        ready, stop_file = self.path("reaper.ready"), self.path("reaper.stop")
        reaper = self.popen_python(self.write("reaper.py", REAPER.format(
            root=ROOT, db_url=self.db_url, ready=ready, stop=stop_file)), stdout=subprocess.PIPE, text=True)
        wait_until(lambda: os.path.exists(ready) or reaper.poll() is not None, 20, message="the reaper to run")
        self.assertIsNone(reaper.poll())

        errors = []

        def stop():
            try:
                app.stop()
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)
        stopper = threading.Thread(target=stop, name="test-stop")
        started = time.monotonic()
        stopper.start()
        self.addCleanup(stopper.join, 30)
        self.addCleanup(lambda: open(self.path("release"), "w").close())  # never leave the task blocked
        # Let stop() wait for the task for node_timeout and more, while the reaper keeps looking.
        hold = node_timeout + 1.5
        wait_until(lambda: not stopper.is_alive() or time.monotonic() - started > hold, 30,
                   message=f"stop() to wait {hold}s")
        self.assertTrue(stopper.is_alive(), f"stop() returned while the task was running: {errors}")
        during = app.get_task_by_id(task_id)
        self.assertEqual((during.status, during.attempts, during.locked_by),
                         ("running", 1, running.locked_by), during.error)
        with open(self.path("release"), "w"):
            pass
        wait_until(lambda: not stopper.is_alive(), 20, message="stop() to return")
        stopped_after = time.monotonic() - started

        with open(stop_file, "w"):
            pass
        out, _ = reaper.communicate(timeout=20)
        self.assertEqual(reaper.returncode, 0)
        rounds = json.loads(out)["rounds"]
        self.assertEqual(errors, [])
        # stop() waited for the task, well past the node timeout, while the reaper kept looking.
        self.assertGreater(stopped_after, hold)
        self.assertGreater(rounds, 10)

        task = app.get_task_by_id(task_id)
        self.assertEqual(task.status, "completed", task.error)
        self.assertEqual(task.attempts, 1)            # never recovered
        self.assertEqual(task.pid, running.pid)
        self.assertEqual(self.runs(), [("start", running.pid, 1), ("done", running.pid, 1)])
        self.assertFalse(process_alive(running.pid))
        self.assertEqual([n[2] for n in self.worker_nodes()], ["stopped"])


# --- 3. outcome write retried ----------------------------------------------------------------------

@on_every_backend
class OutcomeWriteRetriedTest(ResilienceTestCase):

    @sqlite_only("the busy timeout and the write lock held by another connection are SQLite's")
    def test_completion_is_retried_while_the_database_is_locked(self):
        url = self.db_url + "?timeout=0.1"
        worker = LilotaWorker(url)
        locks = []
        met_the_lock = threading.Event()

        @worker.register("lock_and_return")
        def lock_and_return(data):
            # Another connection takes the write lock and keeps it until the worker has failed to
            # record the outcome at least once (past its busy timeout), however slow the machine.
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=5)
            conn.execute("BEGIN IMMEDIATE")

            def hold():
                met_the_lock.wait(30)
                conn.execute("ROLLBACK")
            holder = threading.Thread(target=hold, name="test-lock-holder")
            locks.append((conn, holder))
            holder.start()
            return {"echo": data}

        def release():
            met_the_lock.set()
            for conn, holder in locks:
                holder.join(5)
                conn.close()
        self.addCleanup(release)

        class Notice(logging.Handler):
            def emit(self, record):
                if "could not record" in record.getMessage():
                    met_the_lock.set()

        task_id = LilotaScheduler(url).schedule("lock_and_return", {"x": 1})
        with self.assertLogs("lilota.worker", "WARNING") as logs:
            notice = Notice()
            logging.getLogger("lilota.worker").addHandler(notice)
            try:
                done = worker.run_pending()
            finally:
                logging.getLogger("lilota.worker").removeHandler(notice)
        self.assertEqual(len(locks), 1)
        locks[0][1].join(5)
        self.assertTrue(any("could not record" in line for line in logs.output), logs.output)

        self.assertEqual([t.id for t in done], [task_id])
        task = LilotaScheduler(url).get_task_by_id(task_id)
        self.assertEqual(task.status, "completed", task.error)
        self.assertEqual(task.output, {"echo": {"x": 1}})
        self.assertEqual(task.attempts, 1)
        self.assertEqual(worker.run_pending(), [])


# --- 4. supervisor survives database errors --------------------------------------------------------

class SupervisorDatabaseErrorTest(ResilienceTestCase):

    def test_supervisor_survives_a_locked_database_while_a_worker_dies(self):
        script = self.script()  # the workers use the default busy timeout; the supervisor 0.2 s
        app = Lilota(self.db_url + "?timeout=0.2", script_path=script, number_of_workers=1,
                     heartbeat_interval=0.5, retry_delay=0.05, restart_delay=0.05)
        app.start()
        self.addCleanup(self._stop_and_check, app)
        task_id = app.schedule("block_first", max_attempts=2)
        running = self.wait_status(app, task_id, "running")

        blocker = sqlite3.connect(self.db_path, isolation_level=None, timeout=30, check_same_thread=False)
        self.addCleanup(blocker.close)

        def retried(logs):
            return sum("database error; retrying" in line for line in logs.output)

        with self.assertLogs("lilota", "WARNING") as logs:
            blocker.execute("BEGIN IMMEDIATE")
            try:
                os.kill(running.pid, signal.SIGKILL)
                # Hold the lock while the supervisor handles the death and tries to restart the
                # worker (each attempt waits out the 0.2 s busy timeout, then 0.5 s): about 1 s.
                wait_until(lambda: app.has_failed() or retried(logs) >= 2, 20,
                           message="the supervisor to meet the locked database twice")
            finally:
                blocker.execute("ROLLBACK")
        self.assertFalse(app.has_failed(), app.error)

        task = app.wait(task_id, timeout=30)
        self.assertEqual(task.status, "completed", task.error)
        self.assertEqual(task.attempts, 2)
        self.assertEqual(task.output["attempt"], 2)
        self.assertNotEqual(task.pid, running.pid)
        self.assertTrue(process_alive(task.pid))
        self.assertFalse(process_alive(running.pid))
        self.assertFalse(app.has_failed(), app.error)
        done = app.wait(app.schedule("pid"), timeout=20)
        self.assertEqual(done.status, "completed")


    def test_worker_dying_before_start_after_a_good_run_is_restarted(self):
        # The second run of the script fails before worker.start() (a transient problem): the
        # script is known to work, so this is a crash to restart, not a fatal error.
        script = self.worker_script("""
            HERE = os.path.dirname(os.path.abspath(__file__))
            fd = os.open(os.path.join(HERE, "starts.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, b"%d\\n" % os.getpid())
            os.close(fd)
            with open(os.path.join(HERE, "starts.log")) as f:
                if len(f.read().split()) == 2:
                    sys.exit(3)

            @worker.register("pid")
            def pid(data):
                return {"pid": os.getpid()}
        """)
        app = self.start_lilota(script, 1, restart_delay=0.05)
        first = app.wait(app.schedule("pid"), timeout=30)
        self.assertEqual(first.status, "completed", first.error)
        os.kill(first.pid, signal.SIGKILL)
        wait_until(lambda: app.has_failed() or self.starts() >= 3, 30, message="the worker to be restarted twice")
        self.assertFalse(app.has_failed(), app.error)

        second = app.wait(app.schedule("pid"), timeout=30)
        self.assertEqual(second.status, "completed", second.error)
        self.assertNotEqual(second.pid, first.pid)
        self.assertEqual(self.starts(), 3)
        self.assertEqual([n[2] for n in self.worker_nodes()], ["crashed", "crashed", "running"])
        self.assertFalse(app.has_failed(), app.error)


# --- 5. start methods ------------------------------------------------------------------------------

@on_every_backend
class StartMethodTest(ResilienceTestCase):

    def check_start_method(self, method, hold_storage_lock=False):
        if method not in multiprocessing.get_all_start_methods():
            self.skipTest(f"start method {method} is not available here")
        app = Lilota(self.db_url, script_path=self.script(), number_of_workers=1, start_method=method)
        self.addCleanup(self._stop_and_check, app)
        app.storage  # created now: start() takes no class-wide lock
        # With hold_storage_lock, another thread of the application holds the lock a worker script
        # takes to get its storage while the worker is forked: the child must get a fresh lock,
        # not a copy held by a thread that does not exist there.
        lock = lilota.Storage._instances_lock if hold_storage_lock else None
        if lock is not None:
            lock.acquire()
        try:
            app.start()
            wait_until(lambda: app.has_failed() or self.worker_nodes("running"), 20,
                       message=f"a worker started with {method} to run")
        finally:
            if lock is not None:
                lock.release()
        self.assertFalse(app.has_failed(), app.error)

        done = app.wait(app.schedule("pid"), timeout=30)
        self.assertEqual(done.status, "completed", done.error)
        self.assertEqual(done.output, {"pid": done.pid})
        self.assertIn(done.pid, [n[1] for n in self.worker_nodes()])
        self.assertFalse(app.has_failed(), app.error)

        app.stop(timeout=5)
        self.assertFalse(app.is_running)
        wait_until(lambda: not process_alive(done.pid), 10, message="the worker to exit")
        self.assertEqual([n[2] for n in self.worker_nodes()], ["stopped"])
        self.assertFalse(app.has_failed(), app.error)
        self.assertEqual(self.starts(), 1)

    def test_a_worker_started_with_forkserver_runs_a_task_and_stops(self):
        self.addCleanup(self.stop_forkserver)
        self.check_start_method("forkserver")

    def test_a_worker_forked_while_a_thread_holds_the_storage_lock_runs_a_task_and_stops(self):
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a multi-threaded process: that is the point here.
            warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)
            self.check_start_method("fork", hold_storage_lock=True)

    @staticmethod
    def stop_forkserver():
        from multiprocessing import forkserver
        stop = getattr(forkserver._forkserver, "_stop", None)
        if stop is not None:
            stop()


# --- 6. SIGTERM ------------------------------------------------------------------------------------

@on_every_backend
class SigtermTest(ResilienceTestCase):

    def test_supervised_worker_ignores_sigterm(self):
        app = self.start_lilota(self.script(), 1)
        task_id = app.schedule("sleep", {"seconds": 1})
        running = self.wait_status(app, task_id, "running")
        os.kill(running.pid, signal.SIGTERM)

        task = app.wait(task_id, timeout=20)
        self.assertEqual(task.status, "completed", task.error)
        self.assertEqual(task.output, {"slept": 1})
        self.assertEqual(task.attempts, 1)
        self.assertEqual(task.pid, running.pid)
        self.assertTrue(process_alive(running.pid))

        second = app.wait(app.schedule("pid"), timeout=20)
        self.assertEqual(second.status, "completed", second.error)
        self.assertEqual(second.pid, running.pid)
        self.assertEqual(self.starts(), 1)
        self.assertFalse(app.has_failed(), app.error)


# --- 7. retry() of a task whose input was deleted --------------------------------------------------

@on_every_backend
class RetryDeletedInputTest(ResilienceTestCase):

    def test_retry_refuses_a_task_whose_input_was_deleted_and_reruns_the_others(self):
        worker = LilotaWorker(self.db_url, retry_delay=0)
        failing = {"on": True}
        seen = []

        @worker.register("drop", keep_input=False)
        def drop(data):
            seen.append(("drop", data))
            raise ValueError("drop fails")

        @worker.register("keep")
        def keep(data):
            seen.append(("keep", data))
            if failing["on"]:
                raise ValueError("keep fails")
            return {"got": data}

        scheduler = LilotaScheduler(self.db_url)
        drop_id = scheduler.schedule("drop", {"secret": 1})
        keep_id = scheduler.schedule("keep", {"v": 2})
        none_id = scheduler.schedule("keep", None)
        done = worker.run_pending()
        self.assertEqual(sorted(str(t.id) for t in done), sorted(str(i) for i in (drop_id, keep_id, none_id)))
        self.assertEqual({t.status for t in done}, {"failed"})
        self.assertIsNone(scheduler.get_task_by_id(drop_id).input)

        with self.assertRaisesRegex(lilota.LilotaError, "input was deleted"):
            scheduler.retry(drop_id)
        self.assertEqual(scheduler.get_task_by_id(drop_id).status, "failed")

        failing["on"] = False
        seen.clear()
        self.assertTrue(scheduler.retry(keep_id))
        self.assertTrue(scheduler.retry(none_id))
        for task_id in (keep_id, none_id):
            task = scheduler.get_task_by_id(task_id)
            self.assertEqual(task.status, "scheduled")
            self.assertEqual(task.attempts, 0)
        done = {t.id: t for t in worker.run_pending()}
        self.assertEqual(set(done), {keep_id, none_id})
        self.assertEqual(done[keep_id].status, "completed")
        self.assertEqual(done[keep_id].output, {"got": {"v": 2}})
        self.assertEqual(done[none_id].status, "completed")
        self.assertEqual(done[none_id].output, {"got": None})
        self.assertEqual(sorted(seen, key=repr), sorted([("keep", {"v": 2}), ("keep", None)], key=repr))
        self.assertEqual(scheduler.get_task_by_id(drop_id).status, "failed")  # never ran again


# --- 8. relative SQLite URL ------------------------------------------------------------------------

class RelativeUrlTest(ResilienceTestCase):

    def test_relative_sqlite_path_is_fixed_at_construction(self):
        a, b = self.path("a"), self.path("b")
        os.mkdir(a)
        os.mkdir(b)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(a)
        scheduler = Lilota.scheduler("sqlite:///rel.db")
        worker = LilotaWorker("sqlite:///rel.db")

        @worker.register("echo")
        def echo(data):
            return data

        os.chdir(b)
        task_id = scheduler.schedule("echo", {"x": 1})
        expected = os.path.join(a, "rel.db")
        self.assertTrue(os.path.exists(expected))
        self.assertFalse(os.path.exists(os.path.join(b, "rel.db")))
        conn = sqlite3.connect(expected)
        try:
            self.assertEqual(conn.execute("SELECT id FROM lilota_task").fetchall(), [(str(task_id),)])
        finally:
            conn.close()

        self.assertEqual(scheduler.db_url_for_workers, "sqlite:///" + expected)
        self.assertTrue(expected.startswith("/"))
        # The worker made in A works on A's database too, whatever the current directory.
        done = worker.run_pending()
        self.assertEqual([(t.id, t.status) for t in done], [(task_id, "completed")])
        self.assertFalse(os.path.exists(os.path.join(b, "rel.db")))


# --- 9. cancel wins over retry ---------------------------------------------------------------------

@on_every_backend
class CancelWinsOverRetryTest(ResilienceTestCase):

    def test_task_cancelled_while_running_then_failing_ends_cancelled(self):
        worker = LilotaWorker(self.db_url, retry_delay=0)
        calls = []

        @worker.register("self_cancel")
        def self_cancel(data, ctx: TaskContext):
            calls.append((ctx.attempt, LilotaScheduler(self.db_url).cancel(ctx.task_id)))
            raise RuntimeError("fails after its cancel was asked for")

        task_id = LilotaScheduler(self.db_url).schedule("self_cancel", max_attempts=3)
        done = worker.run_pending()
        self.assertEqual(calls, [(1, True)])
        self.assertEqual([t.id for t in done], [task_id])
        task = done[0]
        self.assertEqual(task.status, "cancelled")
        self.assertEqual(task.attempts, 1)
        self.assertEqual(task.max_attempts, 3)
        self.assertIsNotNone(task.end_date_time)
        self.assertEqual(worker.run_pending(), [])
        self.assertEqual(calls, [(1, True)])


# --- 10-12. storage: progress, dead pids, leases ---------------------------------------------------

@on_every_backend
class StorageFenceTest(ResilienceTestCase):

    def setUp(self):
        super().setUp()
        self.storage = lilota.Storage.for_url(self.db_url)
        self.storage.ensure_ready()

    def test_progress_is_written_only_by_the_owning_node(self):
        scheduler = LilotaScheduler(self.db_url)
        task_id = scheduler.schedule("anything")
        owner, other = str(uuid.uuid4()), str(uuid.uuid4())
        claimed = self.storage.claim(self.storage.prepare_claim([]), owner, os.getpid())
        self.assertEqual(claimed.id, task_id)
        self.assertEqual(str(claimed.locked_by), owner)

        self.storage.set_progress(str(task_id), other, 50)
        task = scheduler.get_task_by_id(task_id)
        self.assertEqual(task.progress_percentage, 0)
        self.assertEqual(task.status, "running")
        self.assertEqual(str(task.locked_by), owner)

        self.storage.set_progress(str(task_id), owner, 40)
        self.assertEqual(scheduler.get_task_by_id(task_id).progress_percentage, 40)

    def gone_pid(self):
        """The pid of a process that has exited and been reaped."""
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait(30)
        if lilota._process_exists(proc.pid):  # reused already: vanishingly rare
            self.skipTest("the pid of an exited process was reused")
        return proc.pid

    def add_node(self, pid, lease=60.0):
        node_id = str(uuid.uuid4())
        self.storage.add_node(node_id, "node", NodeType.WORKER, NodeStatus.RUNNING, pid, lease)
        return node_id

    def test_dead_pid_on_this_host_key_is_lost_at_once_but_not_on_another(self):
        pid = self.gone_pid()
        here = self.add_node(pid)
        # Another container with the same hostname: another boot id / pid namespace.
        there = self.add_node(pid)
        self.execute("UPDATE lilota_node SET host_key = ? WHERE id = ?",
                     socket.gethostname() + "/another-boot-id/4026531999", there)
        self.assertEqual(self.query("SELECT DISTINCT hostname FROM lilota_node"), [(socket.gethostname(),)])
        leases = dict(self.query("SELECT id, lease_expires_at FROM lilota_node"))
        self.assertGreater(min(leases.values()), self.db_time(time.time() + 30))   # both leases still valid

        self.assertEqual(self.storage.find_lost_nodes(), [here])
        self.assertEqual(self.node_status(here), "dead")
        self.assertEqual(self.node_status(there), "running")
        self.assertEqual(self.storage.find_lost_nodes(), [])

    def test_node_with_expired_lease_is_lost_and_one_with_a_valid_lease_is_not(self):
        expired = self.add_node(os.getpid())
        valid = self.add_node(os.getpid())
        now = time.time()
        # On another host: only the lease can tell. last_seen_at says the opposite of the lease.
        self.execute("UPDATE lilota_node SET host_key = 'elsewhere/boot/1', last_seen_at = ?, "
                     "lease_expires_at = ? WHERE id = ?", self.db_time(now), self.db_time(now - 1), expired)
        self.execute("UPDATE lilota_node SET host_key = 'elsewhere/boot/1', last_seen_at = ?, "
                     "lease_expires_at = ? WHERE id = ?", self.db_time(now - 3600), self.db_time(now + 60), valid)

        self.assertEqual(self.storage.find_lost_nodes(), [expired])
        self.assertEqual(self.node_status(expired), "dead")
        self.assertEqual(self.node_status(valid), "running")


@on_every_backend
class CompleteAndClaimTest(ResilienceTestCase):
    """A busy worker stores a task's completion and claims its next task in one commit."""

    def setUp(self):
        super().setUp()
        if self.backend == "sqlite" and not lilota.SQLiteDialect.returning:
            self.skipTest("SQLite before 3.35 has no RETURNING: its claim is a transaction of its own, "
                          "and a completion and a claim are two commits (test_without_returning_...)")
        self.storage = lilota.Storage.for_url(self.db_url)
        self.storage.ensure_ready()
        self.scheduler = LilotaScheduler(self.db_url)
        self.prepared = self.storage.prepare_claim([])

    def status(self, task_id):
        task = self.scheduler.get_task_by_id(task_id)
        return task.status, task.attempts, None if task.locked_by is None else str(task.locked_by)

    def test_the_completion_claims_the_next_task_in_its_commit(self):
        first, second = self.scheduler.schedule("a", priority=1), self.scheduler.schedule("b")
        node = str(uuid.uuid4())
        self.assertEqual(self.storage.claim(self.prepared, node, os.getpid()).id, first)

        stored, following = self.storage.complete_and_claim(str(first), node, json.dumps({"x": 1}), False,
                                                           self.prepared, os.getpid())
        self.assertTrue(stored)
        self.assertEqual(following.id, second)
        self.assertEqual((following.status, following.attempts, str(following.locked_by)), ("running", 1, node))
        task = self.scheduler.get_task_by_id(first)
        self.assertEqual((task.status, task.output, task.progress_percentage), ("completed", {"x": 1}, 100))
        self.assertEqual(self.status(second), ("running", 1, node))

        # The queue is empty: the completion alone.
        self.assertEqual(self.storage.complete_and_claim(str(second), node, "null", False, self.prepared,
                                                         os.getpid()), (True, None))
        self.assertEqual(self.status(second)[0], "completed")

    def test_a_completion_that_is_not_this_nodes_still_claims(self):
        mine, theirs = self.scheduler.schedule("a", priority=1), self.scheduler.schedule("b", priority=1)
        queued = self.scheduler.schedule("c")
        owner, other = str(uuid.uuid4()), str(uuid.uuid4())
        self.storage.claim(self.prepared, owner, os.getpid())
        self.storage.claim(self.prepared, owner, os.getpid())
        stored, following = self.storage.complete_and_claim(str(theirs), other, "1", False, self.prepared,
                                                           os.getpid())
        self.assertFalse(stored)   # recovered and claimed elsewhere, say: not other's to complete
        self.assertEqual(following.id, queued)
        self.assertEqual(self.status(theirs), ("running", 1, owner))
        self.assertEqual(self.status(mine), ("running", 1, owner))
        self.assertEqual(self.status(queued), ("running", 1, other))

    def test_a_claim_that_fails_takes_the_completion_with_it(self):
        first, second = self.scheduler.schedule("a", priority=1), self.scheduler.schedule("b")
        node = str(uuid.uuid4())
        self.storage.claim(self.prepared, node, os.getpid())
        # The same claim, made to break the status CHECK constraint when it updates the next row.
        def break_it(sql):
            return sql.replace("status = 'running'", "status = 'no such status'", 1)
        claim = self.prepared   # the worker's claim: the dialect's statement and what it was built from
        after = claim.prepared.after_completion   # the claim of a completion's statement (PostgreSQL)
        broken = lilota._Claim(claim.prepared._replace(sql=break_it(claim.prepared.sql),
                                                       after_completion=after and (break_it(after[0]), after[1])),
                               claim.defaults, claim.queues, claim.version)
        self.assertNotEqual(broken.prepared, claim.prepared)
        with self.assertRaises(lilota.StorageError):
            self.storage.complete_and_claim(str(first), node, "1", False, broken, os.getpid())
        self.assertEqual(self.status(first), ("running", 1, node))
        self.assertEqual(self.status(second), ("scheduled", 0, None))
        self.assertIsNone(self.scheduler.get_task_by_id(first).output)
        # The connection is usable afterwards, outside any transaction.
        self.assertEqual(self.storage.complete_and_claim(str(first), node, "2", False, self.prepared,
                                                         os.getpid())[0], True)
        self.assertEqual(self.scheduler.get_task_by_id(first).output, 2)

    def run_worker(self, worker, count):
        """Start a standalone worker in a thread, wait for ``count`` tasks to finish, stop it."""
        thread = threading.Thread(target=worker.start, name="test-worker", daemon=True)
        thread.start()
        self.addCleanup(thread.join, 30)
        self.addCleanup(worker.stop)
        wait_until(lambda: self.scheduler.stats()["by_status"].get("completed", 0) >= count, 60,
                   message=f"{count} tasks to complete")
        worker.stop()
        thread.join(30)
        self.assertFalse(thread.is_alive())

    def test_a_busy_worker_claims_through_its_completions(self):
        worker = LilotaWorker(self.db_url)
        worker.register("noop")(lambda data: data)
        ids = [self.scheduler.schedule("noop", {"i": i}) for i in range(30)]
        combined = []
        real = lilota.Storage.complete_and_claim

        def counting(storage, *args, **kwargs):
            result = real(storage, *args, **kwargs)
            combined.append(result)
            return result
        with unittest.mock.patch.object(lilota.Storage, "complete_and_claim", counting):
            self.run_worker(worker, 30)
        # All were queued before the worker started: the first is claimed alone, each next one by
        # the completion of the one before.
        self.assertEqual(len(combined), 30)
        self.assertEqual([next_task.id for _, next_task in combined[:-1]], ids[1:])
        self.assertEqual(combined[-1], (True, None))
        for i, task_id in enumerate(ids):
            task = self.scheduler.get_task_by_id(task_id)
            self.assertEqual((task.status, task.output, task.attempts), ("completed", {"i": i}, 1))

    def recording_worker(self, count):
        """A worker whose no-op task records each run, and ``count`` tasks queued for it."""
        worker, runs = LilotaWorker(self.db_url), []

        @worker.register("noop")
        def noop(data):
            runs.append(data["i"])
            return data
        return worker, runs, [self.scheduler.schedule("noop", {"i": i}) for i in range(count)]

    def assert_released_and_each_run_once(self, released, runs, ids, logs):
        """The task claimed by a commit whose outcome the worker could not see was requeued, giving
        its attempt back; every task ran once and completed; no completion was reported lost."""
        self.assertTrue(any(f"requeued task {released}" in line for line in logs.output), logs.output)
        self.assertFalse(any("was not stored" in line for line in logs.output), logs.output)
        self.assertEqual(sorted(runs), list(range(len(ids))))
        for i, task_id in enumerate(ids):
            task = self.scheduler.get_task_by_id(task_id)
            self.assertEqual((task.status, task.output, task.attempts), ("completed", {"i": i}, 1))

    def test_a_lost_reply_releases_the_claim_and_keeps_the_completion(self):
        worker, runs, ids = self.recording_worker(6)
        real = lilota.Storage.complete_and_claim
        calls = []

        def lose_the_third_reply(storage, *args, **kwargs):
            result = real(storage, *args, **kwargs)   # committed...
            calls.append(result)
            if len(calls) == 3:                      # ...but the reply never arrives
                raise lilota.DatabaseUnavailableError("connection lost (test)")
            return result
        with unittest.mock.patch.object(lilota.Storage, "complete_and_claim", lose_the_third_reply), \
                self.assertLogs("lilota.worker", "INFO") as logs:
            self.run_worker(worker, 6)
        self.assertEqual(calls[2][1].id, ids[3])   # the task claimed by the lost commit
        self.assert_released_and_each_run_once(ids[3], runs, ids, logs)

    def test_an_error_after_the_commit_releases_the_claimed_task(self):
        worker, runs, ids = self.recording_worker(5)
        real = lilota.Storage._claimed
        calls = []

        def lost_after_the_commit(storage, row, *args):
            calls.append(row and str(row[0]))
            if len(calls) == 3:   # committed, then the connection went before the row was taken
                raise lilota.DatabaseUnavailableError("connection lost (test)")
            return real(storage, row, *args)
        with unittest.mock.patch.object(lilota.Storage, "_claimed", lost_after_the_commit), \
                self.assertLogs("lilota.worker", "INFO") as logs:
            self.run_worker(worker, 5)
        self.assertEqual(calls[2], str(ids[2]))   # the task claimed by that commit
        self.assert_released_and_each_run_once(ids[2], runs, ids, logs)

    def test_run_pending_with_a_limit_claims_nothing_past_it(self):
        worker = LilotaWorker(self.db_url)
        worker.register("noop")(lambda data: data)
        ids = [self.scheduler.schedule("noop", {"i": i}) for i in range(4)]
        self.assertEqual([t.id for t in worker.run_pending(limit=2)], ids[:2])
        for task_id in ids[2:]:
            self.assertEqual(self.status(task_id), ("scheduled", 0, None))
            self.assertIsNone(self.scheduler.get_task_by_id(task_id).error)   # never claimed and given back
        self.assertEqual([t.id for t in worker.run_pending()], ids[2:])

    def test_run_pending_gives_back_a_task_claimed_but_not_run(self):
        worker = LilotaWorker(self.db_url)
        worker.register("noop")(lambda data: data)
        ids = [self.scheduler.schedule("noop", {"i": i}) for i in range(3)]
        with unittest.mock.patch.object(lilota.Storage, "get_task", side_effect=KeyboardInterrupt):
            with self.assertRaises(KeyboardInterrupt):   # Ctrl-C after the first completion's commit
                worker.run_pending()
        self.assertEqual(self.status(ids[0])[0], "completed")
        task = self.scheduler.get_task_by_id(ids[1])   # claimed by that commit: back in the queue
        self.assertEqual((task.status, task.attempts, task.locked_by), ("scheduled", 0, None))
        self.assertEqual(task.error["type"], "TaskInterruptedError")
        self.assertEqual(self.status(ids[2]), ("scheduled", 0, None))
        self.assertEqual([t.status for t in worker.run_pending()], ["completed", "completed"])

    def test_stop_during_the_commit_gives_the_claimed_task_back(self):
        worker = LilotaWorker(self.db_url)
        ran = []

        @worker.register("noop")
        def noop(data):
            ran.append(data["i"])
            return data
        ids = [self.scheduler.schedule("noop", {"i": i}) for i in range(3)]
        real = lilota.Storage.complete_and_claim

        def stop_arrives_meanwhile(storage, *args, **kwargs):
            result = real(storage, *args, **kwargs)
            worker.stop()
            return result
        thread = threading.Thread(target=worker.start, name="test-worker", daemon=True)
        with unittest.mock.patch.object(lilota.Storage, "complete_and_claim", stop_arrives_meanwhile):
            thread.start()
            self.addCleanup(worker.stop)
            thread.join(60)
        self.assertFalse(thread.is_alive())
        self.assertEqual(ran, [0])
        task = self.scheduler.get_task_by_id(ids[1])   # claimed by the completion of the first
        self.assertEqual((task.status, task.attempts, task.locked_by), ("scheduled", 0, None))
        self.assertEqual(task.error["type"], "TaskInterruptedError")
        self.assertIn("stopped before running", task.error["message"])
        self.assertEqual(self.status(ids[2]), ("scheduled", 0, None))

    def test_stop_during_a_task_claims_no_next_task(self):
        worker = LilotaWorker(self.db_url)
        ran = []

        @worker.register("stopper")
        def stopper(data):
            ran.append(data["i"])
            worker.stop()
            return data
        ids = [self.scheduler.schedule("stopper", {"i": i}) for i in range(3)]
        thread = threading.Thread(target=worker.start, name="test-worker", daemon=True)
        thread.start()
        self.addCleanup(worker.stop)
        thread.join(60)
        self.assertFalse(thread.is_alive())
        self.assertEqual(ran, [0])
        self.assertEqual(self.status(ids[0])[0], "completed")
        for task_id in ids[1:]:
            self.assertEqual(self.status(task_id), ("scheduled", 0, None))
            self.assertIsNone(self.scheduler.get_task_by_id(task_id).error)


class CompleteAndClaimWithoutReturningTest(ResilienceTestCase):

    def test_without_returning_a_completion_and_a_claim_are_two_commits(self):
        """SQLite before 3.35 (and a dialect whose claim is a transaction of its own): the dialect
        declines, and the worker stores the completion, then claims."""
        worker = LilotaWorker(self.db_url)
        worker.register("noop")(lambda data: data)
        scheduler = LilotaScheduler(self.db_url)
        ids = [scheduler.schedule("noop", {"i": i}) for i in range(5)]
        real = lilota.Storage.complete_and_claim
        results = []

        def recording(storage, *args, **kwargs):
            results.append(real(storage, *args, **kwargs))
            return results[-1]
        with unittest.mock.patch.object(lilota.SQLiteDialect, "returning", False), \
                unittest.mock.patch.object(lilota.Storage, "complete_and_claim", recording):
            done = worker.run_pending()
        self.assertEqual([t.id for t in done], ids)
        self.assertEqual(results, [None] * 5)   # asked at every completion; declined, nothing done
        for i, task in enumerate(done):
            self.assertEqual((task.status, task.output, task.attempts), ("completed", {"i": i}, 1))


class SmallGuaranteesTest(TempDirTestCase):
    """Details found on rereading the code, each with its own failure mode."""

    def test_backoff_stays_bounded_after_many_attempts(self):
        # 2 ** 5000 as a float overflowed: a worker crashing that often killed the supervisor.
        for attempt in (1, 64, 5000, 10 ** 6):
            delay = lilota._backoff(attempt, 0.5, 30.0)
            self.assertLessEqual(delay, 30.0)
            self.assertGreaterEqual(delay, 0.25 if attempt == 1 else 15.0)

    def test_progress_write_error_does_not_fail_the_task(self):
        url = self.db_url + "?timeout=0.1"
        worker = lilota.LilotaWorker(url)

        @worker.register("report")
        def report(data, progress: lilota.TaskProgress):
            blocker = sqlite3.connect(self.db_path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            try:
                progress.set(50)          # the database is locked past the busy timeout
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            return {"done": True}

        task_id = lilota.LilotaScheduler(url).schedule("report", {})
        with self.assertLogs("lilota.worker", "WARNING") as logs:
            [task] = worker.run_pending()
        self.assertEqual(task.id, task_id)
        self.assertEqual(task.status, "completed")
        self.assertEqual(task.output, {"done": True})
        self.assertTrue(any("could not store progress" in line for line in logs.output), logs.output)

    def test_cancelled_task_with_keep_input_false_keeps_no_input(self):
        worker = lilota.LilotaWorker(self.db_url, retry_delay=0)
        scheduler = lilota.LilotaScheduler(self.db_url)

        @worker.register("secret", keep_input=False, max_attempts=3)
        def secret(data, ctx: lilota.TaskContext):
            scheduler.cancel(ctx.task_id)
            raise RuntimeError("fails after its cancel was asked for")

        task_id = scheduler.schedule("secret", {"password": "hunter2"})
        [task] = worker.run_pending()
        self.assertEqual(task.status, "cancelled")
        self.assertIsNone(task.input)
        raw = sqlite3.connect(self.db_path)
        self.addCleanup(raw.close)
        self.assertEqual(raw.execute("SELECT input FROM lilota_task WHERE id = ?", (str(task_id),)).fetchall(),
                         [(None,)])

    def test_negative_busy_timeout_is_refused(self):
        with self.assertRaises(lilota.ConfigurationError):
            lilota.LilotaScheduler(self.db_url + "?timeout=-1")
        with self.assertRaises(lilota.ConfigurationError):
            lilota.LilotaScheduler(self.db_url + "?timeout=soon")


if __name__ == "__main__":
    unittest.main()
