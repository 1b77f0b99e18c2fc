"""Chaos runs with real processes: workers killed with SIGKILL at random under load, an application
killed mid-run, tasks that kill their own worker, and many processes contending for one SQLite file.

Each run checks the outcome against logs the tasks and the killer write themselves (O_APPEND, one
line per write): every task completed, none is left running, every one ran at least once, one ran
again only after an attempt of it was killed, and ``attempts`` agrees.

``python -m unittest`` runs bounded versions (seconds each). ``LILOTA_SOAK_SECONDS=600`` turns the
worker-kill and contention runs into a soak of that length that prints a summary: tasks, kills,
duplicates and what explains them, and the resident memory of the supervisors and workers over
time, which must not grow."""

import collections
import json
import os
import random
import signal
import sys
import threading
import time
import unittest

from support import ROOT, child_pids, on_every_backend, rss_kib, session_members, wait_until
from test_crashes import KILLABLE_APP
from test_processes import WorkerTestCase

from lilota import LilotaScheduler, TaskStatus

SOAK_SECONDS = float(os.environ.get("LILOTA_SOAK_SECONDS") or 0)
SEED = int(os.environ.get("LILOTA_CHAOS_SEED", "6"))

#: Tasks added to test_processes' worker script (its append() logs a line with O_APPEND). "work"
#: logs "<task id> <attempt> <pid>" to runs.log when it starts; the others kill or cripple the
#: worker process that runs them.
CHAOS_TASKS = """
import signal

@worker.register("work", timeout=300)
def work(data, ctx: TaskContext):
    append("runs.log", "%s %d %d" % (ctx.task_id, ctx.attempt, os.getpid()))
    if data.get("sleep"):
        time.sleep(data["sleep"])
    return {"attempt": ctx.attempt}

@worker.register("exit")
def exit_(data):
    os._exit(7)

@worker.register("segfault")
def segfault(data):
    import ctypes
    ctypes.string_at(0)

@worker.register("oom_kill")
def oom_kill(data):
    os.kill(os.getpid(), signal.SIGKILL)   # what the kernel's OOM killer does

@worker.register("hog")
def hog(data):
    # A memory blow-up, capped: the address space may grow 256 MB past its size now. bytearray
    # pages are not touched, so the machine never spends the memory.
    import resource
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + 256 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    chunks = []
    while True:
        chunks.append(bytearray(16 * 2**20))
"""

#: An application process: runs 2 workers and schedules "work" tasks in random batches (one by one
#: or with schedule_many), logging each id once schedule() returned it, with at most BACKLOG of its
#: tasks unfinished; until it scheduled `total` (0: until stop-scheduling exists), then writes its
#: name to done-scheduling.log and idles until the stop file exists.
CHAOS_APP = """
import collections, json, os, random, sys, time
sys.path.insert(0, {root!r})
from lilota import Lilota

HERE = {here!r}

def append(name, lines):
    fd = os.open(os.path.join(HERE, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(line + "\\n" for line in lines).encode())
    finally:
        os.close(fd)

if __name__ == "__main__":
    name, total, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    app = Lilota({db_url!r}, script_path={script!r}, number_of_workers=2, name=name, restart_delay=0.02,
                 restart_max_delay=0.2, retry_delay=0.01, retry_max_delay=0.05, heartbeat_interval=0.5)
    app.start()
    rng = random.Random(seed)
    outstanding = collections.deque()
    scheduled = 0
    def stop_scheduling():
        return app.has_failed() or os.path.exists(os.path.join(HERE, "stop-scheduling")) or (
            total and scheduled >= total)
    while not stop_scheduling():
        while len(outstanding) > {backlog}:
            app.wait(outstanding.popleft(), timeout=120)
        n = rng.randint(1, 40)
        if total:
            n = min(n, total - scheduled)
        inputs = [{{"sleep": rng.choice((0, 0.001, 0.002, 0.004, 0.008))}} for _ in range(n)]
        if rng.random() < 0.5:
            ids = app.schedule_many("work", inputs, max_attempts={max_attempts})
        else:
            ids = [app.schedule("work", data, max_attempts={max_attempts}) for data in inputs]
        append("scheduled.log", [str(i) for i in ids])
        outstanding.extend(ids)
        scheduled += n
    append("done-scheduling.log", [name])
    while not os.path.exists(os.path.join(HERE, "stop")) and not app.has_failed():
        time.sleep(0.05)
    app.stop(timeout=10)
    print(json.dumps({{"name": name, "scheduled": scheduled, "failed": app.has_failed(), "error": app.error}}))
    sys.exit(1 if app.has_failed() else 0)
"""

#: A process that hammers the database for `seconds`: schedule, schedule_many, get_task_by_id,
#: get_all_nodes, cleanup. It reports every exception that reaches it.
CONTENDER = """
import json, os, random, sys, time, traceback
sys.path.insert(0, {root!r})
from lilota import LilotaScheduler

HERE = {here!r}

if __name__ == "__main__":
    index, seconds, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    scheduler = LilotaScheduler({db_url!r})
    ids, errors, ops = [], [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        roll = rng.random()
        try:
            if roll < 0.6:
                ids.append(str(scheduler.schedule("work", {{"from": index}})))
            elif roll < 0.75:
                ids += [str(i) for i in scheduler.schedule_many("work", [{{"from": index}}] * rng.randint(1, 20))]
            elif roll < 0.95:
                if ids:
                    scheduler.get_task_by_id(rng.choice(ids))
            elif roll < 0.99:
                scheduler.get_all_nodes()
            else:
                scheduler.cleanup(older_than=3600)
        except Exception as exc:
            errors.append(traceback.format_exc())
        ops += 1
        if rng.random() < 0.5:
            time.sleep(0.001)
    with open(os.path.join(HERE, "scheduled-%d.log" % index), "w") as f:
        f.write("\\n".join(ids) + "\\n")
    print(json.dumps({{"ops": ops, "scheduled": len(ids), "errors": errors}}))
"""


def report(title, summary):
    print(f"\n{title}:\n" + "".join(f"  {key}: {json.dumps(value)}\n" for key, value in summary.items()),
          file=sys.stderr)


def is_worker_process(pid):
    """A process multiprocessing spawned (a lilota worker), not its resource tracker."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"spawn_main" in f.read()
    except OSError:
        return False


class Killer(threading.Thread):
    """Every 0.2-1 s, SIGKILLs a random worker process of the given applications and logs it; also
    samples the resident memory of the applications and their workers."""

    def __init__(self, app_pids, seed, children):
        super().__init__(name="chaos-killer", daemon=True)
        self.app_pids = app_pids
        self.children = children
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.kills = []             # (pid, time)
        self.samples = []           # (time, {app pid: rss}, max worker rss)
        self.error = None

    def workers(self):
        return [pid for app in self.app_pids for pid in self.children(app) if is_worker_process(pid)]

    def run(self):
        try:
            while not self.stop_event.wait(self.rng.uniform(0.2, 1.0)):
                workers = self.workers()
                self.samples.append((time.monotonic(), {app: rss_kib(app) for app in self.app_pids},
                                     max([rss_kib(w) or 0 for w in workers], default=0)))
                if not workers:
                    continue
                victim = self.rng.choice(workers)
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.kills.append((victim, time.time()))
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self):
        self.stop_event.set()
        self.join(10)


class ChaosTestCase(WorkerTestCase):

    def chaos_script(self):
        return self.script(name="chaos_worker.py", more_tasks=CHAOS_TASKS)

    def check_alive(self, procs):
        """True while every process runs; fails the test with its output once one has ended."""
        for proc in procs:
            if proc.poll() is not None:
                out, err = proc.communicate()
                self.fail(f"process {proc.pid} ended early ({proc.returncode}): {out!r:.500} {err!r:.3000}")
        return True

    def read_lines(self, name):
        try:
            with open(self.path(name)) as f:
                return [line.split() for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def tasks(self, ids=None):
        """{id: (status, attempts, pid, error type)} of the stored tasks (only ``ids`` if given)."""
        rows = self.query("SELECT id, status, attempts, pid, error FROM lilota_task")
        tasks = {row[0]: (row[1], row[2], row[3], json.loads(row[4])["type"] if row[4] else None) for row in rows}
        return tasks if ids is None else {i: tasks.get(i) for i in ids}

    def finished(self):
        """How many tasks are finished (each test's database holds only the tasks it checks)."""
        return self.query("SELECT COUNT(*) FROM lilota_task WHERE status IN "
                          "('completed', 'failed', 'expired', 'cancelled')")[0][0]

    def check_runs(self, ids, kills, interrupted_pids=()):
        """The at-least-once ledger: returns {"duplicates": n, "attempts lost to kills": n}."""
        killed = {pid for pid, _ in kills} | set(interrupted_pids)
        runs = collections.defaultdict(list)
        for task_id, attempt, pid in self.read_lines("runs.log"):
            runs[task_id].append((int(attempt), int(pid)))
        tasks = self.tasks(ids)
        explained = collections.Counter()
        duplicates = lost = 0
        for task_id in ids:
            status, attempts, pid, error_type = tasks[task_id]
            where = f"task {task_id}: {tasks[task_id]}, runs {runs.get(task_id)}"
            self.assertEqual(status, "completed", where)
            self.assertIn(task_id, runs, f"{where}: completed but never ran")
            numbers = [a for a, _ in runs[task_id]]
            self.assertEqual(len(numbers), len(set(numbers)), f"{where}: one attempt ran twice")
            self.assertEqual(max(numbers), attempts, f"{where}: the completing attempt is the last one")
            self.assertEqual(dict(runs[task_id])[attempts], pid, f"{where}: the recorded pid ran it")
            for attempt, run_pid in runs[task_id]:
                if attempt != attempts:
                    self.assertIn(run_pid, killed, f"{where}: ran again though attempt {attempt} was not killed")
                    explained[run_pid] += 1
            if attempts > 1:
                self.assertEqual(error_type, "WorkerDiedError", where)
            duplicates += len(numbers) > 1
            lost += attempts - 1
        self.assertLessEqual(max(explained.values(), default=0), 1, "one killed process ended two attempts")
        self.assertLessEqual(lost, len(killed), "more attempts lost than worker processes killed")
        self.assertEqual(set(runs) - set(ids), set(), "a task ran that nobody scheduled")
        return {"duplicates": duplicates, "attempts lost to kills": lost}


@on_every_backend
class WorkerKillTest(ChaosTestCase):

    def test_random_sigkills_lose_nothing_and_run_twice_only_what_was_killed(self):
        soak = SOAK_SECONDS > 0
        total_per_app = 0 if soak else 2500
        script = self.chaos_script()
        app_script = self.write("chaos_app.py", CHAOS_APP.format(
            root=ROOT, here=self.dir, db_url=self.db_url, script=script, backlog=600, max_attempts=1000))
        LilotaScheduler(self.db_url).storage.ensure_ready()
        apps = [self.popen_python(app_script, f"app{i}", str(total_per_app), str(SEED + i), stdout=-1, stderr=-1)
                for i in range(2)]
        self.wait_workers_running(4)
        killer = Killer([p.pid for p in apps], SEED, child_pids)
        killer.start()
        self.addCleanup(killer.stop)
        started = time.monotonic()

        if soak:
            wait_until(lambda: self.check_alive(apps) and time.monotonic() - started > SOAK_SECONDS,
                       SOAK_SECONDS + 60, interval=1, message="the soak to end")
            open(self.path("stop-scheduling"), "w").close()
        wait_until(lambda: self.check_alive(apps) and len(self.read_lines("done-scheduling.log")) == 2,
                   180, interval=0.05, message="both applications to finish scheduling")
        ids = [i for (i,) in self.read_lines("scheduled.log")]
        wait_until(lambda: self.check_alive(apps) and self.finished() == len(ids), 240, interval=0.1,
                   message="every scheduled task to finish")
        killer.stop()
        self.assertIsNone(killer.error)
        open(self.path("stop"), "w").close()
        outputs = []
        for proc in apps:
            out, err = proc.communicate(timeout=60)
            self.assertEqual(proc.returncode, 0, err.decode()[-3000:])
            outputs.append(json.loads(out.decode().splitlines()[-1]))
        elapsed = time.monotonic() - started

        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(len(ids), sum(o["scheduled"] for o in outputs))
        if not soak:
            self.assertEqual(len(ids), 2 * total_per_app)
        self.assertEqual(self.query("SELECT status, COUNT(*) FROM lilota_task GROUP BY status"),
                         [("completed", len(ids))], "every task completed; none stuck running")
        self.assertGreater(len(killer.kills), 0)
        ledger = self.check_runs(ids, killer.kills)
        summary = dict(seconds=round(elapsed, 1), tasks=len(ids), kills=len(killer.kills),
                       worker_starts=self.starts(), **ledger)
        summary["duplicates explained"] = "each by a SIGKILL of the worker running the earlier attempt"
        summary["RSS MiB (supervisor, worker) per tenth of the run"] = self.memory_summary(killer.samples)
        if soak or os.environ.get("LILOTA_CHAOS_VERBOSE"):
            report("worker-kill chaos", summary)
        if soak:
            self.check_no_growth(killer.samples)

    def memory_summary(self, samples):
        """The largest resident memory (MiB) of an application and of a worker, per tenth of the run."""
        if not samples:
            return []
        windows = collections.defaultdict(lambda: [0, 0])
        start, end = samples[0][0], samples[-1][0]
        for when, apps, worker in samples:
            window = windows[min(9, int((when - start) / max(end - start, 1e-9) * 10))]
            window[0] = max(window[0], max((v or 0) for v in apps.values()))
            window[1] = max(window[1], worker)
        return [[round(a / 1024, 1), round(w / 1024, 1)] for _, (a, w) in sorted(windows.items())]

    def check_no_growth(self, samples):
        """Soak only: the supervisors' memory at the end is within 20 MiB of the first quarter's peak."""
        quarter = max(1, len(samples) // 4)
        first = max(max((v or 0) for v in apps.values()) for _, apps, _ in samples[:quarter])
        last = max(max((v or 0) for v in apps.values()) for _, apps, _ in samples[-quarter:])
        self.assertLess(last - first, 20 * 1024, f"supervisor RSS grew from {first} KiB to {last} KiB")
        first_w = max(w for _, _, w in samples[:quarter])
        last_w = max(w for _, _, w in samples[-quarter:])
        self.assertLess(last_w - first_w, 20 * 1024, f"worker RSS grew from {first_w} KiB to {last_w} KiB")


@on_every_backend
class ApplicationKillTest(ChaosTestCase):

    def test_killed_application_leaves_no_orphans_and_a_new_one_finishes_every_task(self):
        """max_attempts counts every execution (DESIGN 3), also one cut short because the whole
        application died: these tasks allow 3, so the one the killed application was running
        completes on its second attempt; with the default 1 it would end failed (test_crashes)."""
        script = self.chaos_script()
        rng = random.Random(SEED)
        scheduler = LilotaScheduler(self.db_url)
        ids = [str(i) for i in scheduler.schedule_many(
            "work", [{"sleep": rng.choice((0.005, 0.01, 0.02))} for _ in range(240)], max_attempts=3)]
        proc = self.popen_python(self.write("doomed_app.py", KILLABLE_APP.format(
            root=ROOT, db_url=self.db_url, script=script, workers=3)))

        def running():
            return dict(self.query("SELECT id, pid FROM lilota_task WHERE status = 'running'"))
        wait_until(lambda: self.finished() >= 40 and len(running()) == 3, 60,
                   message="the application to be mid-run, each of its workers on a task")
        doomed_workers = set(session_members(proc.pid)) - {proc.pid}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        cut_short = running()
        wait_until(lambda: not session_members(proc.pid), 5, message="every process of the killed application to exit")
        self.assertLessEqual(set(cut_short.values()), doomed_workers)

        app = self.start_lilota(script, 2)
        for task_id in ids:
            self.assertEqual(app.wait(task_id, timeout=60).status, TaskStatus.COMPLETED)
        ledger = self.check_runs(ids, kills=[], interrupted_pids=doomed_workers)
        self.assertLessEqual(ledger["attempts lost to kills"], len(cut_short))
        tasks = self.tasks(ids)
        for task_id in ids:
            self.assertEqual(tasks[task_id][1], 2 if task_id in cut_short else 1, tasks[task_id])
        statuses = dict(self.query("SELECT pid, status FROM lilota_node WHERE type = 'worker'"))
        for pid in set(cut_short.values()):
            self.assertEqual(statuses[pid], "dead")
        self.assertFalse(app.has_failed())


@on_every_backend
class PoisonPillTest(ChaosTestCase):

    def test_tasks_that_kill_their_worker_fail_alone(self):
        app = self.start_lilota(self.chaos_script(), 2, restart_delay=0.05, restart_max_delay=0.5, retry_delay=0.01)
        self.wait_workers_running(2)
        names = ["work"] * 80 + ["exit", "segfault", "oom_kill", "hog"]
        random.Random(SEED).shuffle(names)
        scheduled = [(name, app.schedule(name, {"sleep": 0.005}, max_attempts=2)) for name in names]
        deaths = {"exit": "exit code 7", "segfault": "SIGSEGV", "oom_kill": "SIGKILL"}
        for name, task_id in scheduled:
            task = app.wait(task_id, timeout=60)
            if name == "work":
                self.assertEqual((task.status, task.attempts), (TaskStatus.COMPLETED, 1), task.error)
                continue
            self.assertEqual((task.status, task.attempts), (TaskStatus.FAILED, 2), name)
            if name == "hog":   # the capped blow-up is a MemoryError in the task: the worker lives on
                self.assertEqual(task.error["type"], "MemoryError")
                self.assertIn("bytearray", task.error["traceback"])
            else:
                self.assertEqual(task.error["type"], "WorkerDiedError", name)
                self.assertIn("died", task.error["message"])
                self.assertIn(deaths[name], task.error["message"])
        # Each poisoned attempt took down its own worker and nothing else: no innocent task ran
        # twice, and exactly one worker process died per poisoned attempt.
        work = [str(task_id) for name, task_id in scheduled if name == "work"]
        self.check_runs(work, kills=[])
        wait_until(lambda: len(self.worker_nodes("running")) == 2, 30, message="both worker slots to be refilled")
        self.assertEqual([n[2] for n in self.worker_nodes()].count("crashed"), 2 * len(deaths))
        self.assertEqual(self.starts(), 2 + 2 * len(deaths))
        self.assertFalse(app.has_failed())


class ContentionTest(ChaosTestCase):

    def test_eight_schedulers_and_eight_workers_on_one_file(self):
        """No 'database is locked' reaches the user: the busy timeout and the retries absorb it."""
        seconds = max(30.0, SOAK_SECONDS) if SOAK_SECONDS else 6.0
        LilotaScheduler(self.db_url).storage.ensure_ready()
        app = self.start_lilota(self.chaos_script(), 8)
        self.wait_workers_running(8, timeout=60)
        rss_before = {h.process.pid: rss_kib(h.process.pid) for h in app._handles if h is not None}
        contender = self.write("contender.py", CONTENDER.format(root=ROOT, here=self.dir, db_url=self.db_url))
        procs = [self.popen_python(contender, str(i), str(seconds), str(SEED + i), stdout=-1, stderr=-1)
                 for i in range(8)]
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=seconds + 120)
            self.assertEqual(proc.returncode, 0, err.decode()[-3000:])
            outputs.append(json.loads(out.decode().splitlines()[-1]))
        errors = [error for output in outputs for error in output["errors"]]
        self.assertEqual(errors, [], "an error reached a scheduling process")
        ids = [i for n in range(8) for (i,) in self.read_lines(f"scheduled-{n}.log")]
        self.assertEqual(len(ids), sum(o["scheduled"] for o in outputs))
        wait_until(lambda: self.finished() == len(ids), 180, interval=0.1, message="every task to finish")
        rss_after = {h.process.pid: rss_kib(h.process.pid) for h in app._handles if h is not None}
        self.assertEqual(self.query("SELECT status, COUNT(*) FROM lilota_task GROUP BY status"),
                         [("completed", len(ids))])
        ledger = self.check_runs(ids, kills=[])
        self.assertEqual(ledger["duplicates"], 0)
        self.assertEqual([n[2] for n in self.worker_nodes()], ["running"] * 8, "no worker died")
        self.assertFalse(app.has_failed())
        self.assertEqual(set(rss_after), set(rss_before), "the same 8 worker processes throughout")
        summary = {"seconds": seconds, "operations": sum(o["ops"] for o in outputs), "tasks": len(ids),
                   "worker RSS MiB before/after": [[round(rss_before[p] / 1024, 1), round(rss_after[p] / 1024, 1)]
                                                   for p in sorted(rss_before)]}
        if SOAK_SECONDS or os.environ.get("LILOTA_CHAOS_VERBOSE"):
            report("contention", summary)
        if SOAK_SECONDS:
            for pid in rss_before:
                self.assertLess(rss_after[pid] - rss_before[pid], 20 * 1024, f"worker {pid} grew")


if __name__ == "__main__":
    unittest.main()
