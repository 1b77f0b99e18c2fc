"""The command line, `python -m lilota`, driven as a subprocess against a real database, and the
scheduler queries it stands on (list_tasks, stats)."""

import json
import os
import pty
import select
import signal
import sqlite3
import subprocess
import time
import unittest

from support import TempDirTestCase, on_every_backend, wait_until

import lilota

# A worker script's tasks: "add" and "boom" run at once; "gated" sets 50 % and then waits until the
# test creates the file named in its input, so a test can watch it at 50 % for as long as it needs.
TASKS = """
    @worker.register("add")
    def add(data):
        return {"sum": data["a"] + data["b"]}

    @worker.register("boom")
    def boom(data):
        raise ValueError("boom")

    @worker.register("gated", task_progress=TaskProgress)
    def gated(data, progress):
        progress.set(50)
        while not os.path.exists(data["gate"]):
            time.sleep(0.01)
        return {"opened": True}

    @worker.register("die")
    def die(data):
        os._exit(1)
"""


def read_until(fd, needle, timeout=30.0):
    """Read from ``fd`` until ``needle`` (bytes) has appeared; return all that was read."""
    data, deadline = b"", time.monotonic() + timeout
    while needle not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; read so far: {data!r}")
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"end of output before {needle!r}; read: {data!r}")
            data += chunk
    return data


def read_to_end(fd, timeout=30.0):
    """Read from ``fd`` until its end (EOF, or EIO on a pseudo-terminal whose other side closed)."""
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return data
            if not chunk:
                return data
            data += chunk
    raise AssertionError(f"no end of output after {timeout}s; read: {data!r}")


class CliTestCase(TempDirTestCase):
    """Runs `python -m lilota` against this test's database, with an in-process worker
    (``run_pending``) to give tasks their outcomes without worker processes."""

    def setUp(self):
        super().setUp()
        self.scheduler = lilota.LilotaScheduler(self.db_url)
        self.worker = lilota.LilotaWorker(self.db_url)
        self.worker.register("add")(lambda data: {"sum": data["a"] + data["b"]})

        @self.worker.register("boom")
        def boom(data):
            raise ValueError("boom")

    def cli(self, *args, db=True, **kwargs):
        """Run the command line (with ``--db`` this test's database unless ``db`` is false)."""
        return self.run_python("-m", "lilota", *args, *(("--db", self.db_url) if db else ()), timeout=60, **kwargs)

    def assertOk(self, result):
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def assertError(self, result, code, text, last_line_only=False, msg=None):
        """Exit ``code``, no traceback, and the error as one line on stderr that contains ``text``
        (with ``last_line_only``: the last line; the lines before are progress)."""
        self.assertEqual(result.returncode, code, (msg, result.stdout, result.stderr))
        self.assertNotIn("Traceback", result.stderr)
        lines = result.stderr.strip().splitlines()
        if not last_line_only:
            self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[-1].startswith("lilota: "), result.stderr)
        self.assertIn(text, lines[-1])

    def start_workers(self):
        """A started Lilota with one worker process running TASKS."""
        return self.start_lilota(self.worker_script(TASKS), number_of_workers=1)

    def set_column(self, task_id, column, value):
        """Write one column of a task's row directly (to make it look old, or running)."""
        conn = sqlite3.connect(self.db_path)
        with conn:
            conn.execute(f"UPDATE lilota_task SET {column} = ? WHERE id = ?", (value, str(task_id)))
        conn.close()



class WorkerCommandTest(CliTestCase):

    def test_runs_tasks_until_sigterm(self):
        script = self.worker_script("""
            @worker.register("double")
            def double(data):
                return {"value": data["n"] * 2}
        """)
        proc = self.popen_python("-m", "lilota", "worker", script, "-n", "1", "--db", self.db_url,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        scheduler = lilota.LilotaScheduler(self.db_url)
        task = scheduler.wait(scheduler.schedule("double", {"n": 21}), timeout=60)
        self.assertEqual((task.status, task.output), ("completed", {"value": 42}))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        [node] = [n for n in scheduler.get_all_nodes() if n.type == "worker"]
        self.assertEqual(node.status, "stopped")
        events = [line.split(" ", 2)[2] for line in out.splitlines() if not line.startswith("lilota:")]
        self.assertEqual(events, [f"worker-0 started (pid {node.pid})", f"worker-0 stopped (pid {node.pid})"])
        self.assertIn("lilota: stopping", out)

    def test_reports_a_crash_and_the_restart_and_stops_on_ctrl_c(self):
        proc = self.popen_python("-m", "lilota", "worker", self.worker_script(TASKS), "-n", "1",
                                 "--db", self.db_url, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        task = self.scheduler.wait(self.scheduler.schedule("die"), timeout=60)
        self.assertEqual(task.error["type"], "WorkerDiedError")
        workers = lambda: [n for n in self.scheduler.get_all_nodes() if n.type == "worker"]  # noqa: E731
        wait_until(lambda: [n.status for n in workers()] == ["crashed", "running"], 60, message="a restart")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        first, second = workers()
        events = [line.split(" ", 2)[2] for line in out.splitlines() if not line.startswith("lilota:")]
        self.assertEqual(events, [f"worker-0 started (pid {first.pid})", f"worker-0 crashed (pid {first.pid})",
                                  f"worker-0 started (pid {second.pid})", f"worker-0 stopped (pid {second.pid})"])

    def run_worker(self, script, task, *options, env=None):
        """Run `lilota worker SCRIPT -n 1 OPTIONS` until ``task`` (name, input) has finished, then stop it
        with SIGTERM; return the finished Task, the command's stdout and its stderr."""
        proc = self.popen_python("-m", "lilota", "worker", script, "-n", "1", "--db", self.db_url, *options,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            finished = self.wait_alive(proc, self.scheduler.schedule(*task))
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        return finished, out, err

    def wait_alive(self, proc, task_id, timeout=60):
        """The finished task, waited for while the worker command ``proc`` runs (a script that fails
        ends the command: the test fails at once, not after the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.scheduler.wait(task_id, timeout=0.2)
            except lilota.TaskWaitTimeout:
                if proc.poll() is not None:
                    self.fail(f"the worker command ended with exit code {proc.returncode}: {proc.stderr.read()}")
        self.fail(f"task {task_id} did not finish in {timeout}s")

    def package(self):
        """pkg/tasks.py, a worker script in a package whose task "answer" needs a relative import."""
        os.mkdir(self.path("pkg"))
        self.write("pkg/__init__.py", "")
        self.write("pkg/models.py", "VALUE = 40\n")
        self.worker_script("""
            from .models import VALUE

            @worker.register("answer")
            def answer(data):
                return {"value": VALUE + 2, "module": __spec__.name}
        """, name="pkg/tasks.py")

    def test_a_script_in_a_package_runs_as_its_module_given_as_a_path_or_a_module(self):
        self.package()
        for script in ("pkg/tasks.py", "pkg.tasks"):
            task, out, err = self.run_worker(script, ("answer", {}))
            self.assertEqual((task.status, task.output), ("completed", {"value": 42, "module": "pkg.tasks"}), err)
            self.assertIn(f"of {self.path('pkg/tasks.py')} on", out)

    def test_lilota_runs_a_script_in_a_package_with_its_relative_imports(self):
        self.package()
        self.start_lilota(self.path("pkg/tasks.py"), number_of_workers=1)
        task = self.scheduler.wait(self.scheduler.schedule("answer"), timeout=60)
        self.assertEqual((task.status, task.output), ("completed", {"value": 42, "module": "pkg.tasks"}))

    def test_a_module_that_cannot_be_found_is_a_usage_error(self):
        self.package()
        self.assertError(self.cli("worker", "pkg.nosuch"), 2, "no worker script or module 'pkg.nosuch': give a "
                                                              f"path (e.g. tasks.py) or a module importable from")
        self.assertError(self.cli("worker", "nosuch.tasks"), 2,
                         "cannot import the worker module 'nosuch.tasks': No module named 'nosuch'")
        self.assertFalse(os.path.exists(self.db_path))

    CHATTY = """
        import logging

        @worker.register("chatty")
        def chatty(data, ctx: TaskContext):
            ctx.logger.info("info from ctx.logger")
            ctx.logger.warning("warning from ctx.logger")
            logging.getLogger("myapp").warning("warning from myapp")
            return 1
    """

    def test_ctx_logger_warnings_reach_stderr_like_other_loggers(self):
        script = self.worker_script(self.CHATTY)
        task, out, err = self.run_worker(script, ("chatty",), env={"LILOTA_LOG_LEVEL": ""})
        self.assertEqual(task.status, "completed", err)
        self.assertIn("warning from ctx.logger\n", err)    # as Python shows an unconfigured warning
        self.assertIn("warning from myapp\n", err)
        self.assertNotIn("info from ctx.logger", err)
        self.assertNotIn("lilota.", err)                   # lilota's own log stays quiet without -v

    def test_verbose_shows_info_records_of_ctx_logger_and_lilota_in_the_worker_processes(self):
        script = self.worker_script(self.CHATTY + """
        @worker.register("fails")
        def fails(data):
            raise ValueError("nope")
        """)
        proc = self.popen_python("-m", "lilota", "-v", "worker", script, "-n", "1", "--db", self.db_url,
                                 env={"LILOTA_LOG_LEVEL": ""}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            for name in ("chatty", "fails"):
                self.wait_alive(proc, self.scheduler.schedule(name))
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        self.assertRegex(err, r"\d\d:\d\d:\d\d,\d{3} INFO task\.chatty: info from ctx\.logger\n")
        self.assertIn(" WARNING task.chatty: warning from ctx.logger\n", err)
        self.assertIn(" WARNING myapp: warning from myapp\n", err)
        self.assertIn(" WARNING lilota.worker: task ", err)   # lilota's log, from the worker process
        self.assertIn("attempt 1/1 failed: ValueError: nope", err)

    def test_bad_arguments_are_usage_errors(self):
        script = self.worker_script(TASKS)
        self.assertError(self.cli("worker", script, "-n", "0"), 2, "argument -n/--workers")
        self.assertError(self.cli("worker", script, "--stop-timeout", "soon"), 2, "invalid duration 'soon'")
        self.assertError(self.cli("worker", script, "--db", "nosuch://x", db=False), 2, "no lilota dialect")

    def test_missing_script_is_one_line_and_exit_code_2(self):
        self.assertError(self.cli("worker", "no_such_script.py"), 2, "no_such_script.py")

    def test_broken_script_exits_1_with_its_traceback(self):
        script = self.write("broken.py", "raise RuntimeError('cannot start')\n")
        result = self.run_python("-m", "lilota", "worker", script, "-n", "1", "--db", self.db_url, timeout=60)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("RuntimeError: cannot start", result.stderr)


class ScheduleCommandTest(CliTestCase):

    def test_prints_the_id_of_the_stored_task_with_its_options(self):
        out = self.assertOk(self.cli("schedule", "add", '{"a": 2, "b": 3}', "--delay", "30s", "--priority", "5",
                                     "--max-attempts", "3"))
        task = self.scheduler.get_task_by_id(out.strip())
        self.assertEqual((task.name, task.input, task.status, task.priority, task.max_attempts),
                         ("add", {"a": 2, "b": 3}, "scheduled", 5, 3))
        self.assertAlmostEqual((task.run_at - task.created_at).total_seconds(), 30, delta=0.01)

    def test_run_at_with_a_zone_and_timeout(self):
        out = self.assertOk(self.cli("schedule", "add", "{}", "--run-at", "2030-01-31T09:00:00+01:00",
                                     "--timeout", "1h30m", "--max-attempts", "2"))
        task = self.scheduler.get_task_by_id(out.strip())
        self.assertEqual((task.run_at.isoformat(), task.timeout.total_seconds(), task.max_attempts, task.status),
                         ("2030-01-31T08:00:00+00:00", 5400, 2, "scheduled"))
        out = self.assertOk(self.cli("schedule", "add", "{}", "--run-at", "2030-01-31T08:00:00.500Z"))
        self.assertEqual(self.scheduler.get_task_by_id(out.strip()).run_at.isoformat(),
                         "2030-01-31T08:00:00.500000+00:00")

    def test_bad_run_at_and_timeout_are_usage_errors(self):
        self.assertError(self.cli("schedule", "add", "{}", "--run-at", "2030-01-31T09:00:00"), 2,
                         "the time '2030-01-31T09:00:00' has no zone: add one, e.g. 2030-01-31T09:00:00Z")
        self.assertError(self.cli("schedule", "add", "{}", "--run-at", "tomorrow"), 2, "invalid time 'tomorrow'")
        self.assertError(self.cli("schedule", "add", "{}", "--run-at", "2030-01-31T09:00:00Z", "--delay", "5m"), 2,
                         "not allowed with argument")
        self.assertError(self.cli("schedule", "add", "{}", "--timeout", "0"), 2, "timeout must be a positive")
        self.assertError(self.cli("schedule", "add", "{}", "--timeout", "-5m"), 2, "a duration must be positive")
        self.assertFalse(os.path.exists(self.db_path), "nothing may be written")

    def test_input_from_stdin_none_and_json_output(self):
        out = self.assertOk(self.cli("schedule", "add", "-", "--json", input='{"a": 1,\n "b": 1}'))
        self.assertEqual(self.scheduler.get_task_by_id(json.loads(out)["id"]).input, {"a": 1, "b": 1})
        out = self.assertOk(self.cli("schedule", "add"))
        self.assertIsNone(self.scheduler.get_task_by_id(out.strip()).input)

    def test_invalid_json_names_line_and_column_and_writes_nothing(self):
        result = self.cli("schedule", "add", '{"a": 1,\n "b": }')
        self.assertError(result, 2, "invalid JSON input at line 2, column 7: Expecting value")
        self.assertError(self.cli("schedule", "add", '{"a": NaN}'), 2, "NaN is not allowed")
        self.assertFalse(os.path.exists(self.db_path), "nothing may be written, not even the database")

    def test_bad_options_are_usage_errors(self):
        self.assertError(self.cli("schedule", "add", "{}", "--delay", "5 minutes"), 2, "invalid duration")
        self.assertError(self.cli("schedule", "add", "{}", "--priority", "high"), 2, "--priority")
        self.assertError(self.cli("schedule", "add", "{}", "--priority", str(2 ** 40)), 2, "priority must be")
        self.assertError(self.cli("schedule", "add", "{}", "--max-attempts", "0"), 2, "at least 1")
        self.assertError(self.cli("schedule", " add", "{}"), 2, "a task name must be")
        self.assertEqual(self.scheduler.list_tasks(), [])

    def test_wait_prints_the_output_or_fails_with_the_error(self):
        self.start_workers()
        result = self.cli("schedule", "add", '{"a": 2, "b": 3}', "--wait")
        task_id, output = self.assertOk(result).split("\n", 1)
        self.assertEqual(json.loads(output), {"sum": 5})
        self.assertEqual(self.scheduler.get_task_by_id(task_id).status, "completed")
        self.assertEqual(result.stderr.splitlines()[-1], "completed 100%")
        result = self.cli("schedule", "boom", "{}", "--wait")
        self.assertError(result, 1, "failed: ValueError: boom", last_line_only=True)
        result = self.cli("schedule", "add", '{"a": 1, "b": 1}', "--wait", "--json")
        self.assertEqual((json.loads(self.assertOk(result))["output"], result.stderr), ({"sum": 2}, ""))


class ListCommandTest(CliTestCase):

    def make_tasks(self):
        """A completed and a failed task, then a queued one: newest first, queued, failed, completed."""
        done = self.scheduler.schedule("add", {"a": 1, "b": 2})
        failed = self.scheduler.schedule("boom", {})
        self.worker.run_pending()
        queued = self.scheduler.schedule("add", {"a": 0, "b": 0}, delay=60)
        return str(done), str(failed), str(queued)

    def test_table_newest_first(self):
        done, failed, queued = self.make_tasks()
        lines = self.assertOk(self.cli("list")).splitlines()
        self.assertEqual(lines[0].split(), ["ID", "NAME", "QUEUE", "STATUS", "PROGRESS", "ATTEMPTS", "AGE", "DURATION"])
        rows = [line.split() for line in lines[1:]]
        self.assertEqual([tuple(r[:6]) for r in rows],
                         [(queued, "add", "default", "scheduled", "0%", "0/-"),
                          (failed, "boom", "default", "failed", "0%", "1/1"),
                          (done, "add", "default", "completed", "100%", "1/1")])
        self.assertEqual(rows[0][7], "-")                        # never ran: no duration
        self.assertRegex(rows[2][7], r"^\d+ms$")

    def test_no_duration_for_a_task_queued_again_after_a_run(self):
        requeued = self.scheduler.schedule("add", {"a": 1, "b": 2}, delay=60)
        self.set_column(requeued, "start_date_time", time.time() - 5)   # given back on stop: no end
        running = self.scheduler.schedule("add", {"a": 1, "b": 2}, delay=60)
        self.set_column(running, "start_date_time", time.time() - 5)
        self.set_column(running, "status", "running")
        rows = {line.split()[0]: line.split() for line in self.assertOk(self.cli("list")).splitlines()[1:]}
        self.assertEqual((rows[str(requeued)][3], rows[str(requeued)][7]), ("scheduled", "-"))
        self.assertRegex(rows[str(running)][7], r"^5(\.\d)?s$")     # running: the duration so far

    def test_filters_limit_and_json_lines(self):
        done, failed, queued = self.make_tasks()
        self.assertEqual(self.assertOk(self.cli("list", "--status", "failed")).splitlines()[1].split()[0], failed)
        lines = self.assertOk(self.cli("list", "--name", "add", "--limit", "1")).splitlines()
        self.assertEqual([lines[1].split()[0], lines[2]], [queued, "(the newest 1; --limit shows more)"])
        out = self.assertOk(self.cli("list", "--json"))
        tasks = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([t["id"] for t in tasks], [queued, failed, done])
        self.assertEqual(tasks[2], self.scheduler.get_task_by_id(done).as_dict())
        self.assertEqual(self.assertOk(self.cli("list", "--name", "nothing", "--json")), "")
        self.assertEqual(self.assertOk(self.cli("list", "--name", "nothing")), "no tasks\n")

    def test_unknown_status_and_bad_limit(self):
        self.make_tasks()
        self.assertError(self.cli("list", "--status", "done"), 2, "invalid choice: 'done'")
        self.assertError(self.cli("list", "--limit", "0"), 2, "at least 1")

    def test_database_from_environment_else_lilota_db_in_the_current_directory(self):
        # The test's database is lilota.db in the directory the command runs in: the default.
        task_id = self.assertOk(self.cli("schedule", "add", db=False, env={"LILOTA_DB_URL": ""})).strip()
        self.assertIsNotNone(self.scheduler.get_task_by_id(task_id))
        self.assertIn(task_id, self.assertOk(self.cli("list", db=False, env={"LILOTA_DB_URL": self.db_url})))
        result = self.cli("list", db=False, env={"LILOTA_DB_URL": "sqlite:///" + self.path("other.db")})
        self.assertError(result, 4, "no lilota database at " + self.path("other.db"))

    def test_unusable_databases_are_one_line_errors(self):
        result = self.cli("list")
        self.assertError(result, 4, f"no lilota database at {self.db_path}")
        self.assertFalse(os.path.exists(self.db_path), "a command that only reads must not create a database")
        self.write("lilota.db", "this is not a database\n" * 100)
        self.assertError(self.cli("list"), 4, "is not a valid SQLite database")
        self.assertError(self.cli("stats", "--db", "sqlite:///no/such/dir/x.db", db=False), 4, "no lilota database")
        self.assertError(self.cli("schedule", "add", "--db", "sqlite:///no/such/dir/x.db", db=False), 4,
                         "does not exist")
        self.assertError(self.cli("nodes", "--db", "postgres-ish:///x", db=False), 2, "no lilota dialect")


class ShowCommandTest(CliTestCase):

    def test_every_field_with_input_and_the_error_traceback(self):
        task_id = self.scheduler.schedule("boom", {"files": ["a.txt", "b.txt"]})
        self.worker.run_pending()
        out = self.assertOk(self.cli("show", str(task_id)))
        # The task's fields come first; the attempts, steps and log follow after a blank line.
        fields = dict(line.split(":", 1) for line in out.split("\n\n")[0].splitlines() if line[:1].isalpha())
        self.assertEqual(set(fields), {f.name for f in __import__("dataclasses").fields(lilota.Task)})
        self.assertEqual((fields["id"].strip(), fields["status"].strip(), fields["attempts"].strip()),
                         (str(task_id), "failed", "1"))
        self.assertIn('input:\n  {\n    "files": [\n      "a.txt",', out)
        self.assertIn("  type:               ValueError\n  message:            boom\n", out)
        self.assertIn("  traceback:\n    Traceback (most recent call last):", out)
        self.assertIn("\n    ValueError: boom", out)

    def test_a_deadline_counts_down_only_while_the_task_runs(self):
        done = self.scheduler.schedule("add", {"a": 1, "b": 2})
        self.worker.run_pending()
        self.assertGreater(self.scheduler.get_task_by_id(done).expires_at.timestamp(), time.time())
        expires = [line for line in self.assertOk(self.cli("show", str(done))).splitlines()
                   if line.startswith("expires_at:")]
        self.assertRegex(expires[0], r"^expires_at: +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC$")
        running = self.scheduler.schedule("add", {"a": 1, "b": 2})
        self.set_column(running, "status", "running")
        self.set_column(running, "expires_at", time.time() + 300)
        self.assertRegex(self.assertOk(self.cli("show", str(running))), r"\nexpires_at: +\S+ \S+ UTC \(in 4m5\ds\)\n")

    def test_json_document(self):
        task_id = self.scheduler.schedule("add", {"a": 1, "b": 2})
        self.worker.run_pending()
        out = self.assertOk(self.cli("show", str(task_id), "--json"))
        # The task's fields, then its attempts, steps and last log records (test_long_work checks those).
        shown = json.loads(out)
        self.assertEqual((shown.pop("steps"), shown.pop("logs")), ([], []))
        self.assertEqual([(a["number"], a["outcome"]) for a in shown.pop("attempt_records")], [(1, "completed")])
        self.assertEqual(shown, self.scheduler.get_task_by_id(task_id).as_dict())

    def test_bad_and_unknown_ids(self):
        self.scheduler.schedule("add", {"a": 1, "b": 2})
        self.assertError(self.cli("show", "12345"), 2, "'12345' is not a task id")
        self.assertError(self.cli("show", "8c3f6a8e-2b1d-4c6e-9f0a-5d7e1b2c3d4e"), 3,
                         "no task with id 8c3f6a8e-2b1d-4c6e-9f0a-5d7e1b2c3d4e")


class WaitCommandTest(CliTestCase):

    def test_exit_code_says_how_the_task_ended(self):
        done = self.scheduler.schedule("add", {"a": 1, "b": 2})
        failed = self.scheduler.schedule("boom", {})
        self.worker.run_pending()
        cancelled = self.scheduler.schedule("add", {"a": 1, "b": 2})
        self.scheduler.cancel(cancelled)
        result = self.cli("wait", str(done))
        self.assertEqual(json.loads(self.assertOk(result)), {"sum": 3})
        self.assertEqual(result.stderr, "completed 100%\n")
        self.assertError(self.cli("wait", str(failed)), 1, f"task {failed} failed: ValueError: boom",
                         last_line_only=True)
        self.assertError(self.cli("wait", str(cancelled)), 1, "cancelled: TaskCancelledError", last_line_only=True)
        result = self.cli("wait", str(failed), "--json")
        self.assertEqual(json.loads(result.stdout)["error"]["type"], "ValueError")
        self.assertError(result, 1, "failed", last_line_only=False)

    def test_timeout_and_unknown_id(self):
        queued = self.scheduler.schedule("add", {"a": 1, "b": 2})
        result = self.cli("wait", str(queued), "--timeout", "200ms")
        self.assertError(result, 5, f"task {queued} is still scheduled after 200ms", last_line_only=True)
        self.assertError(self.cli("wait", "8c3f6a8e-2b1d-4c6e-9f0a-5d7e1b2c3d4e"), 3, "no task with id")

    def test_ctrl_c_ends_the_wait_quietly(self):
        queued = self.scheduler.schedule("add", {"a": 1, "b": 2})
        proc = self.popen_python("-m", "lilota", "wait", str(queued), "--db", self.db_url,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertIn(b"scheduled 0%", read_until(proc.stderr.fileno(), b"\n"))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        self.assertEqual((proc.returncode, out, err), (130, b"", b""))

    def test_plain_lines_when_not_a_terminal(self):
        self.start_workers()
        gate = self.path("gate")
        task_id = self.scheduler.schedule("gated", {"gate": gate})
        proc = self.popen_python("-m", "lilota", "wait", str(task_id), "--db", self.db_url,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = read_until(proc.stderr.fileno(), b"running 50%\n")
        open(gate, "w").close()
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        lines = (seen + err).decode().splitlines()
        self.assertEqual(lines[-2:], ["running 50%", "completed 100%"])
        self.assertEqual(len(lines), len(set(lines)), "a line only when something changed")
        self.assertEqual(json.loads(out), {"opened": True})

    def test_progress_bar_on_a_terminal(self):
        self.start_workers()
        gate = self.path("gate")
        task_id = self.scheduler.schedule("gated", {"gate": gate})
        master, slave = pty.openpty()
        try:
            proc = self.popen_python("-m", "lilota", "wait", str(task_id), "--db", self.db_url,
                                     stdin=slave, stdout=slave, stderr=slave)
        finally:
            os.close(slave)
        try:
            seen = read_until(master, b"]  50%  running")
            open(gate, "w").close()
            seen += read_to_end(master)
        finally:
            os.close(master)
        self.assertEqual(proc.wait(60), 0)
        text = seen.decode()
        self.assertIn("\r\x1b[K[" + "#" * 15 + "-" * 15 + "]  50%  running  ", text)   # redrawn in place
        self.assertIn("\r\x1b[K[" + "#" * 30 + "] 100%  completed  ", text)
        self.assertNotIn("running 50%\r\n", text)                                        # no plain lines
        self.assertTrue(text.endswith('\r\n{\r\n  "opened": true\r\n}\r\n'), text[-200:])


class CancelRetryCleanupTest(CliTestCase):

    def test_cancel(self):
        queued = self.scheduler.schedule("add", {"a": 1, "b": 2})
        self.assertEqual(self.assertOk(self.cli("cancel", str(queued))), f"task {queued} cancelled\n")
        self.assertEqual(self.scheduler.get_task_by_id(queued).status, "cancelled")
        self.assertOk(self.cli("cancel", str(queued)))   # already cancelled: still what was asked
        done = self.scheduler.schedule("add", {"a": 1, "b": 2})
        self.worker.run_pending()
        self.assertError(self.cli("cancel", str(done)), 1, f"task {done} already completed; nothing to cancel")
        running = self.scheduler.schedule("add", {"a": 1, "b": 2})
        self.set_column(running, "status", "running")
        self.assertIn("is running: asked its worker to stop it", self.assertOk(self.cli("cancel", str(running))))
        self.assertTrue(self.scheduler.get_task_by_id(running).cancel_requested)
        self.assertError(self.cli("cancel", "8c3f6a8e-2b1d-4c6e-9f0a-5d7e1b2c3d4e"), 3, "no task with id")
        self.assertError(self.cli("cancel", "nope"), 2, "is not a task id")

    def test_retry(self):
        failed = self.scheduler.schedule("boom", {})
        self.worker.run_pending()
        self.assertEqual(self.assertOk(self.cli("retry", str(failed))), f"task {failed} queued again\n")
        task = self.scheduler.get_task_by_id(failed)
        self.assertEqual((task.status, task.attempts), ("scheduled", 0))
        self.assertError(self.cli("retry", str(failed)), 1, "is scheduled; only failed, expired or cancelled")
        self.assertError(self.cli("retry", "8c3f6a8e-2b1d-4c6e-9f0a-5d7e1b2c3d4e"), 3, "no task with id")
        self.worker.register("forget", keep_input=False)(lambda data: 1 / 0)
        forgotten = self.scheduler.schedule("forget", {"secret": 1})
        self.worker.run_pending()
        self.assertError(self.cli("retry", str(forgotten)), 1, "its input was deleted")

    def test_cleanup_deletes_only_tasks_finished_longer_ago(self):
        old, recent = self.scheduler.schedule_many("add", [{"a": 1, "b": 1}, {"a": 2, "b": 2}])
        self.worker.run_pending()
        queued = self.scheduler.schedule("add", {"a": 3, "b": 3}, delay=3600)
        self.set_column(old, "end_date_time", time.time() - 2 * 86400)
        self.assertEqual(self.assertOk(self.cli("cleanup")),
                         "deleted 0 task(s) that finished more than 30d ago and 0 node(s) gone since then\n")
        self.assertEqual(self.assertOk(self.cli("cleanup", "--older-than", "1d")),
                         "deleted 1 task(s) that finished more than 1d ago and 0 node(s) gone since then\n")
        self.assertEqual({t.id for t in self.scheduler.list_tasks()}, {recent, queued})
        self.assertError(self.cli("cleanup", "--older-than=-1d"), 2, "invalid duration")


class NodesAndStatsCommandTest(CliTestCase):

    def test_nodes_with_liveness(self):
        app = lilota.Lilota.scheduler(self.db_url, name="web-app")
        app.start()
        self.addCleanup(app.stop)
        self.worker.run_pending()   # leaves a stopped worker node
        lines = self.assertOk(self.cli("nodes")).splitlines()
        self.assertEqual(lines[0].split(), ["ID", "NAME", "TYPE", "STATUS", "PID", "LAST", "SEEN", "LIVENESS",
                                            "QUEUES", "REASON"])
        rows = {line.split()[1]: line.split() for line in lines[1:]}
        # ID NAME TYPE STATUS PID LAST SEEN (two words) LIVENESS QUEUES REASON
        self.assertEqual(rows["web-app"][2:5] + rows["web-app"][7:10], ["scheduler", "running", str(os.getpid()),
                                                                        "alive", "-", "-"])
        self.assertEqual(rows["run_pending"][2:4] + rows["run_pending"][7:9], ["worker", "stopped", "-", "default"])
        conn = sqlite3.connect(self.db_path)
        with conn:
            conn.execute("UPDATE lilota_node SET lease_expires_at = ? WHERE name = 'web-app'", (time.time() - 1,))
        conn.close()
        nodes = {n["name"]: n for n in map(json.loads, self.assertOk(self.cli("nodes", "--json")).splitlines())}
        self.assertEqual((nodes["web-app"]["type"], nodes["web-app"]["liveness"]), ("scheduler", "lease expired"))
        self.assertEqual(nodes["web-app"]["id"], app.node_id)

    def test_stats_counts_and_throughput(self):
        self.scheduler.schedule_many("add", [{"a": i, "b": 1} for i in range(3)])
        self.scheduler.schedule("boom", {})
        self.worker.run_pending()
        self.scheduler.schedule("add", {"a": 0, "b": 0}, delay=60)
        out = self.assertOk(self.cli("stats"))
        self.assertIn("scheduled      1\nwaiting        0\nrunning        0\ncompleted      3\nfailed         1\n", out)
        self.assertIn("total          5\n", out)
        self.assertNotIn("created", out)
        by_name = {line.split()[0]: line.split()[1:] for line in out.split("\n\n")[1].splitlines()}
        self.assertEqual(by_name["NAME"], ["SCHEDULED", "WAITING", "RUNNING", "COMPLETED", "FAILED", "EXPIRED",
                                           "CANCELLED", "TOTAL"])
        self.assertEqual((by_name["add"], by_name["boom"]), (["1", "0", "0", "3", "0", "0", "0", "4"],
                                                             ["0", "0", "0", "0", "1", "0", "0", "1"]))
        self.assertIn("last minute: 4 finished (0.067/s): 3 completed, 1 failed, 0 expired, 0 cancelled", out)
        stats = json.loads(self.assertOk(self.cli("stats", "--json")))
        self.assertEqual((stats["by_status"]["completed"], stats["last_hour"]["finished"]), (3, 4))


class HelpAndArgumentsTest(CliTestCase):

    COMMANDS = ("worker", "schedule", "list", "show", "wait", "cancel", "retry", "cleanup", "nodes", "stats")

    def test_help_documents_each_command_with_an_example(self):
        out = self.assertOk(self.cli("--help", db=False))
        for command in self.COMMANDS:
            self.assertRegex(out, rf"\n    {command} +\w")
        self.assertIn("Exit codes:", out)
        for command in self.COMMANDS:
            out = self.assertOk(self.cli(command, "--help", db=False))
            self.assertIn(f"Example:\n  python -m lilota {command}", out)
            self.assertIn("--db URL", out)
            self.assertEqual("--json" in out, command not in ("worker", "cancel", "retry", "cleanup"), command)

    def test_usage_errors_are_one_line(self):
        self.assertError(self.cli(db=False), 2, "required: COMMAND")
        self.assertError(self.cli("frobnicate", db=False), 2, "invalid choice: 'frobnicate'")
        self.assertError(self.cli("list", "--colour"), 2, "unrecognized arguments: --colour")

    def test_db_and_verbose_before_or_after_the_command_where_after_wins(self):
        task_id = str(self.scheduler.schedule("add", {"a": 1, "b": 2}))
        self.assertIn(task_id, self.assertOk(self.cli("--db", self.db_url, "list", db=False)))
        self.assertIn(task_id, self.assertOk(self.cli("-v", "--db", self.db_url, "show", task_id, db=False)))
        other = "sqlite:///" + self.path("other.db")
        self.assertIn(task_id, self.assertOk(self.cli("--db", other, "list", "--db", self.db_url, db=False)))
        self.assertError(self.cli("--db", self.db_url, "list", "--db", other, db=False), 4, "other.db")
        self.assertIn("--db URL", self.assertOk(self.cli("--help", db=False)))

    def test_durations(self):
        parse = lilota._parse_duration
        self.assertEqual([parse(t) for t in ("500ms", "30s", "5m", "2h", "7d", "1.5h", "10", ".5s")],
                         [0.5, 30, 300, 7200, 604800, 5400, 10, 0.5])
        self.assertEqual([parse(t) for t in ("5min", "90s", "1h30m", "2d", "1d2h3m4s", "1m500ms", "0")],
                         [300, 90, 5400, 172800, 93784, 60.5, 0])
        for text in ("", "s", "5x", "5 minutes", "inf", "nans", "1e999s", "5mins", "h1", "1h 30m", "+5s", "5S"):
            with self.assertRaises(Exception, msg=text) as caught:
                parse(text)
            self.assertIn("500ms, 90s, 5min, 1h30m or 2d", str(caught.exception))
        for text in ("-5s", "-1h30m", "-.5", "-3"):
            with self.assertRaises(Exception, msg=text) as caught:
                parse(text)
            self.assertIn("must be positive", str(caught.exception))

    def test_a_negative_duration_must_be_positive_however_it_is_written(self):
        task_id = str(self.scheduler.schedule("add", {"a": 1, "b": 2}))
        for args in (["wait", task_id, "--timeout", "-5s"], ["wait", task_id, "--timeout=-5s"],
                     ["wait", task_id, "--timeout", "-5"], ["cleanup", "--older-than", "-1d"],
                     ["schedule", "add", "--delay", "-1h30m"], ["worker", "tasks.py", "--keep-finished", "-7d"]):
            self.assertError(self.cli(*args), 2, "a duration must be positive", msg=args)
        self.assertError(self.cli("wait", task_id, "--timeout"), 2, "expected one argument")
        task = self.scheduler.get_task_by_id(self.assertOk(self.cli("schedule", "add", "--delay", "1h30m")).strip())
        self.assertAlmostEqual((task.run_at - task.created_at).total_seconds(), 5400, delta=0.01)
        self.assertEqual([lilota._format_duration(s) for s in (0.25, 12.34, 60, 303, 7200, 5400, 30 * 86400, 90061)],
                         ["250ms", "12.3s", "1m", "5m03s", "2h", "1h30m", "30d", "1d01h"])


@on_every_backend
class TaskIdPrefixTest(TempDirTestCase):
    """Task ids shortened to their first characters, as git does: find_task_ids() and the commands
    that take an id. The ids are set by the test, so that which prefixes are shared is known."""

    A = "abcdef01-2345-7000-8000-000000000001"
    B = "abcdef01-2345-7000-8000-000000000002"
    C = "abcdef02-0000-7000-8000-000000000003"
    NEIGHBOURS = ("abcdef00-ffff-7fff-bfff-ffffffffffff", "abcdef03-0000-7000-8000-000000000000")

    def setUp(self):
        super().setUp()
        self.scheduler = lilota.LilotaScheduler(self.db_url)
        ids = self.scheduler.schedule_many("boom", [{}] * 5)
        for old, new in zip(ids, (self.A, self.B, self.C) + self.NEIGHBOURS):
            self.db_execute("UPDATE lilota_task SET id = ? WHERE id = ?", new, str(old))

    def cli(self, *args):
        return self.run_python("-m", "lilota", *args, "--db", self.db_url, timeout=60)

    def test_find_task_ids_is_a_range_on_the_id(self):
        find = lambda prefix, **kw: [str(i) for i in self.scheduler.find_task_ids(prefix, **kw)]  # noqa: E731
        self.assertEqual(find("abcdef01"), [self.A, self.B])
        self.assertEqual(find("abcdef01", limit=1), [self.A])
        self.assertEqual(find("ABCDEF0123457000800000000000000"), [self.A, self.B])   # any case, no hyphens
        self.assertEqual(find("abcdef01-2345-7000-8000-000000000002"), [self.B])
        self.assertEqual(find("abcdef02-"), [self.C])
        self.assertEqual(find("abcdef0"), [self.NEIGHBOURS[0], self.A, self.B, self.C, self.NEIGHBOURS[1]])
        self.assertEqual(find("abcdef04"), [])
        for bad in ("", "-", "abcdefg1", "abcdef01 ", "a" * 33, None):
            with self.assertRaises(ValueError, msg=bad):
                find(bad)

    def test_commands_take_a_unique_prefix(self):
        out = self.cli("show", "ABCDEF02")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn(f"id:                   {self.C}\n", out.stdout)
        out = self.cli("show", "{" + self.C.upper() + "}")
        self.assertIn(f"id:                   {self.C}\n", out.stdout)
        out = self.cli("cancel", "abcdef01-2345-7000-8000-0000000000-02")   # hyphens anywhere
        self.assertEqual((out.returncode, out.stdout), (0, f"task {self.B} cancelled\n"), out.stderr)
        out = self.cli("retry", "abcdef01234570008000000000000002")
        self.assertEqual((out.returncode, out.stdout), (0, f"task {self.B} queued again\n"), out.stderr)
        self.scheduler.cancel(self.C)
        out = self.cli("wait", "abcdef02")
        self.assertEqual(out.returncode, 1)
        self.assertIn(f"task {self.C} cancelled", out.stderr)

    def test_an_ambiguous_prefix_lists_the_candidates_and_an_unknown_one_is_no_such_task(self):
        for command in ("show", "wait", "cancel", "retry"):
            out = self.cli(command, "abcdef01")
            self.assertEqual((out.returncode, out.stdout), (2, ""), out.stderr)
            self.assertEqual(out.stderr, f"lilota: the id prefix abcdef01 is ambiguous: it starts the ids of 2 "
                                         f"tasks: {self.A}, {self.B}; give more characters\n")
            out = self.cli(command, "abcdef04")
            self.assertEqual((out.returncode, out.stderr),
                             (3, "lilota: no task with an id that starts with abcdef04\n"), command)
        out = self.cli("show", "abcdef0")
        self.assertEqual(out.returncode, 2)
        self.assertIn("'abcdef0' is not a task id: give a UUID like '12345678-1234-5678-1234-567812345678', "
                      "or at least 8 of its first characters", out.stderr)
        self.assertEqual(self.scheduler.get_task_by_id(self.A).status, "scheduled")

    def test_an_ambiguous_prefix_lists_at_most_ten(self):
        ids = self.scheduler.schedule_many("boom", [{}] * 10)
        for n, old in enumerate(ids):
            self.db_execute("UPDATE lilota_task SET id = ? WHERE id = ?", f"abcdef01-{n:04d}-7000-8000-000000000000",
                            str(old))
        out = self.cli("show", "abcdef01")
        self.assertEqual(out.returncode, 2)
        self.assertIn("is ambiguous: it starts the ids of more than 10 tasks: abcdef01-0000-", out.stderr)
        self.assertTrue(out.stderr.endswith("abcdef01-0009-7000-8000-000000000000, ...; give more characters\n"),
                        out.stderr)


class QueryApiTest(TempDirTestCase):
    """LilotaScheduler.list_tasks() and stats(): what `list` and `stats` show."""

    def setUp(self):
        super().setUp()
        self.scheduler = lilota.LilotaScheduler(self.db_url)
        self.worker = lilota.LilotaWorker(self.db_url)
        self.worker.register("add")(lambda data: data["a"] + data["b"])

        @self.worker.register("boom")
        def boom(data):
            raise ValueError("boom")

    def test_list_tasks_newest_first_with_filters_and_limit(self):
        first = self.scheduler.schedule("add", {"a": 1, "b": 2})
        failing = self.scheduler.schedule("boom", {})
        self.worker.run_pending()
        queued = self.scheduler.schedule("add", {"a": 3, "b": 4}, delay=60)
        self.assertEqual([t.id for t in self.scheduler.list_tasks()], [queued, failing, first])
        self.assertEqual([t.id for t in self.scheduler.list_tasks(status="failed")], [failing])
        self.assertEqual([t.id for t in self.scheduler.list_tasks(status=lilota.TaskStatus.SCHEDULED,
                                                                  name="add")], [queued])
        self.assertEqual([t.id for t in self.scheduler.list_tasks(name="add", limit=1)], [queued])
        self.assertEqual(self.scheduler.list_tasks(name="nothing"), [])
        self.assertEqual(self.scheduler.list_tasks(limit=None)[-1].output, 3)

    def test_list_tasks_rejects_unknown_status_and_bad_limit(self):
        with self.assertRaisesRegex(ValueError, "unknown task status 'done'.*completed"):
            self.scheduler.list_tasks(status="done")
        for limit in (0, -1, 1.5, True):
            with self.assertRaises(ValueError):
                self.scheduler.list_tasks(limit=limit)

    def test_stats_counts_per_status_and_name_and_recent_throughput(self):
        self.scheduler.schedule_many("add", [{"a": i, "b": 1} for i in range(3)])
        self.scheduler.schedule("boom", {})
        self.worker.run_pending()
        self.scheduler.schedule("add", {"a": 0, "b": 0}, delay=60)
        old = self.scheduler.schedule("add", {"a": 0, "b": 0})
        self.worker.run_pending()
        # One task finished two hours ago: counted, but in neither window.
        with sqlite3.connect(self.db_path) as conn:
            conn.execute("UPDATE lilota_task SET end_date_time = ? WHERE id = ?", (time.time() - 7200, str(old)))
        conn.close()
        stats = self.scheduler.stats()
        self.assertEqual(stats["total"], 6)
        self.assertEqual(stats["by_status"], {"created": 0, "scheduled": 1, "waiting": 0, "running": 0, "completed": 4,
                                              "failed": 1, "expired": 0, "cancelled": 0})
        self.assertEqual(stats["by_name"], {"add": {"completed": 4, "scheduled": 1}, "boom": {"failed": 1}})
        for window, seconds in (("last_minute", 60), ("last_hour", 3600)):
            self.assertEqual(stats[window], {"completed": 3, "failed": 1, "expired": 0, "cancelled": 0,
                                             "finished": 4, "per_second": round(4 / seconds, 3)})

    def test_stats_of_an_empty_database(self):
        stats = self.scheduler.stats()
        self.assertEqual((stats["total"], stats["by_name"], stats["last_hour"]["finished"]), (0, {}, 0))


if __name__ == "__main__":
    unittest.main()
