"""The command line, `python -m lilota`, driven as a subprocess against a real database, and the
scheduler queries it stands on (list_tasks, stats)."""

import signal
import sqlite3
import subprocess
import time
import unittest

try:
    from .support import TempDirTestCase
except ImportError:  # run from inside tests/
    from support import TempDirTestCase

import lilota


class WorkerCommandTest(TempDirTestCase):

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
        self.assertEqual([n.status for n in scheduler.get_all_nodes() if n.type == "worker"], ["stopped"])

    def test_missing_script_is_one_line_and_exit_code_2(self):
        result = self.run_python("-m", "lilota", "worker", "no_such_script.py", "--db", self.db_url, timeout=60)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("no_such_script.py", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_broken_script_exits_1_with_its_traceback(self):
        script = self.write("broken.py", "raise RuntimeError('cannot start')\n")
        result = self.run_python("-m", "lilota", "worker", script, "-n", "1", "--db", self.db_url, timeout=60)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("RuntimeError: cannot start", result.stderr)


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
        self.assertEqual(stats["by_status"], {"created": 0, "scheduled": 1, "running": 0, "completed": 4,
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
