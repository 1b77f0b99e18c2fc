"""`python -m lilota worker`: runs the worker processes of a script until SIGTERM, and reports a bad
script as one line on stderr with a non-zero exit code."""

import signal
import subprocess
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


if __name__ == "__main__":
    unittest.main()
