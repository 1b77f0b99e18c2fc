"""The quick example: add two numbers in a background worker process.

Run it from the repository root:  python examples/quick_example.py
"""
import os
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # only needed when running from a checkout, not with lilota installed

from lilota.core import Lilota  # noqa: E402
from lilota.models import Task  # noqa: E402

DB_PATH = os.path.join(HERE, "quick_example.db")   # the same database as myscript.py uses


@dataclass
class AddInput():
    a: int
    b: int


@dataclass
class AddOutput():
    sum: int


lilota = Lilota(
    db_url="sqlite:///" + DB_PATH,
    script_path=os.path.join(HERE, "myscript.py"),
    number_of_workers=2,
)


def main():
    # Start from an empty database on every run.
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(DB_PATH + suffix):
            os.remove(DB_PATH + suffix)

    # Start lilota: two worker processes, each running myscript.py
    lilota.start()
    try:
        # Schedule a task
        task_id = lilota.schedule("add", AddInput(a=2, b=3))

        # Block until a worker has executed it (no sleeping and hoping)
        lilota.wait(task_id, timeout=60)

        # Retrieve task information from the database and print the result
        task: Task = lilota.get_task_by_id(task_id)
        print("We add the numbers 2 and 3: ")
        print(task.output)
        print(f"{task.status}: 2 + 3 = {AddOutput(**task.output).sum}")
    finally:
        # Stop the worker processes
        lilota.stop()


# Worker processes are started with multiprocessing's "spawn": the application must only act under
# this guard, because each worker process imports this module again.
if __name__ == "__main__":
    main()
