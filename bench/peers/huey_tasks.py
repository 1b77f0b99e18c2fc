"""huey's tasks for the benchmark (imported by the application and by the consumer)."""
import os
import time

from huey import SqliteHuey

# huey's SQLite storage with its defaults (WAL; synchronous left at SQLite's default, FULL).
huey = SqliteHuey("bench", filename=os.environ["BENCH_HUEY_DB"])


@huey.task()
def noop(i=None):
    return None           # no result row: huey's cheapest path


@huey.task()
def cpu10(i=None):
    end = time.thread_time() + 0.010
    while time.thread_time() < end:
        pass
    return None


@huey.task()
def stamp():
    return time.time()    # stored as the task's result: when the task function started
