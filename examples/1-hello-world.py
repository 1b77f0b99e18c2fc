"""1. Hello World: run a task without input in a background worker process.

Run it from the repository root:  python examples/1-hello-world.py
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # only needed when running from a checkout, not with lilota installed

from lilota.core import Lilota  # noqa: E402

DB_PATH = os.path.join(HERE, "1-hello-world.db")   # the same file as in workers/hello_world.py


def main():
    # Start from an empty database on every run.
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(DB_PATH + suffix):
            os.remove(DB_PATH + suffix)

    lilota = Lilota(
        db_url="sqlite:///" + DB_PATH,
        script_path=os.path.join(HERE, "workers", "hello_world.py"),
        number_of_workers=1,
    )
    # "with" starts the worker process and stops it at the end of the block.
    with lilota:
        task_id = lilota.schedule("hello_world")
        task = lilota.wait(task_id, timeout=60)   # returns the finished Task
        print(task.output["message"])
        print(f"task {task.id} {task.status} after {task.attempts} attempt(s)")


if __name__ == "__main__":   # required: worker processes are started with multiprocessing "spawn"
    main()
