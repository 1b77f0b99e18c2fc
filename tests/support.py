"""Shared helpers for lilota's tests: temporary databases, worker scripts, polling with a deadline,
and checks that no worker process outlives a test."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import lilota  # noqa: E402


def wait_until(predicate, timeout=20.0, interval=0.01, message="condition"):
    """Poll ``predicate`` until it returns a true value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def live_processes():
    """(pid, parent pid, session id) of every live (non-zombie) process, from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            yield int(entry), int(fields[1]), int(fields[3])   # state, ppid, pgrp, session


def child_pids(pid=None):
    """Pids of the live direct children of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return [p for p, ppid, _ in live_processes() if ppid == pid]


def session_members(sid):
    """Pids of the live processes in session ``sid`` (e.g. a program and the workers it started)."""
    return [p for p, _, session in live_processes() if session == sid]


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class TempDirTestCase(unittest.TestCase):
    """A test with its own directory and SQLite database, removed afterwards."""

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp(prefix="lilota-test-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.db_path = os.path.join(self.dir, "lilota.db")
        self.db_url = "sqlite:///" + self.db_path
        self.addCleanup(self._close_storages)

    def _close_storages(self):
        for key, storage in list(lilota.Storage._instances.items()):
            if self.dir in key:
                storage.close()
                del lilota.Storage._instances[key]

    def path(self, name):
        return os.path.join(self.dir, name)

    def db_rows(self, sql, *params):
        """Run one statement on a connection of the test's own (autocommit) and return its rows."""
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def write(self, name, text):
        """Write a file (dedented) into the test directory and return its path."""
        path = self.path(name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text).lstrip("\n"))
        return path

    def worker_script(self, body, name="worker_script.py", db_url=None):
        """A worker script: imports, ``worker = LilotaWorker(db_url)``, ``body``, ``worker.start()``."""
        header = (
            "import os, sys, time, json\n"
            "from dataclasses import dataclass\n"
            "from datetime import timedelta\n"
            f"sys.path.insert(0, {ROOT!r})\n"
            "from lilota import LilotaWorker, TaskProgress, TaskContext\n"
            f"worker = LilotaWorker(db_url={db_url or self.db_url!r})\n"
        )
        footer = "\nif __name__ == '__main__':\n    worker.start()\n"
        return self.write(name, header + textwrap.dedent(body).strip("\n") + "\n" + footer)

    def start_lilota(self, script, number_of_workers=2, **options):
        """A started Lilota that is stopped (quickly) when the test ends."""
        app = lilota.Lilota(self.db_url, script_path=script, number_of_workers=number_of_workers, **options)
        app.start()
        self.addCleanup(self._stop_and_check, app)
        return app

    def _stop_and_check(self, app):
        handles = [h for h in app._handles if h is not None]
        pids = [h.process.pid for h in handles]
        app.stop(timeout=5)
        for pid in pids:
            wait_until(lambda: not process_alive(pid), 10, message=f"worker {pid} to exit")

    def run_python(self, *args, timeout=120, env=None, **kwargs):
        """Run ``python args...`` in the test directory; return the CompletedProcess."""
        environment = dict(os.environ, PYTHONPATH=ROOT)
        environment.update(env or {})
        return subprocess.run([sys.executable, *args], cwd=self.dir, env=environment, timeout=timeout,
                              capture_output=True, text=True, **kwargs)

    def popen_python(self, *args, env=None, **kwargs):
        """Start ``python args...`` in its own process group; it is killed (group) at cleanup."""
        environment = dict(os.environ, PYTHONPATH=ROOT)
        environment.update(env or {})
        proc = subprocess.Popen([sys.executable, *args], cwd=self.dir, env=environment,
                                start_new_session=True, **kwargs)

        def kill():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        self.addCleanup(kill)
        return proc
