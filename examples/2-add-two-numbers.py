"""2. Add two numbers using an input and an output model (dataclasses).

Run it from the repository root:  python examples/2-add-two-numbers.py
"""
import os
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # only needed when running from a checkout, not with lilota installed

from lilota.core import Lilota  # noqa: E402
from lilota.models import Task  # noqa: E402

DB_PATH = os.path.join(HERE, "2-add-two-numbers.db")   # the same file as in workers/add.py


# The models are usually defined in a module shared by the application and the worker script;
# they are repeated here to keep each file readable on its own.
@dataclass
class AddInput:
    a: int
    b: int


@dataclass
class AddOutput:
    sum: int


def main():
    # Start from an empty database on every run.
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(DB_PATH + suffix):
            os.remove(DB_PATH + suffix)

    lilota = Lilota(
        db_url="sqlite:///" + DB_PATH,
        script_path=os.path.join(HERE, "workers", "add.py"),
        number_of_workers=2,
    )
    lilota.start()
    try:
        task_id = lilota.schedule("add", AddInput(a=2, b=3))
        lilota.wait(task_id, timeout=60)

        task: Task = lilota.get_task_by_id(task_id)
        print(task.output)                       # the output is stored as a dict: {'sum': 5}
        add_output = AddOutput(**task.output)    # ... and turns back into the model
        print(f"2 + 3 = {add_output.sum}")

        # Several tasks at once, stored in one transaction
        ids = lilota.schedule_many("add", [AddInput(a=i, b=i) for i in range(1, 4)])
        sums = [AddOutput(**lilota.wait(i, timeout=60).output).sum for i in ids]
        print(f"1+1, 2+2, 3+3 = {sums}")
    finally:
        lilota.stop()


if __name__ == "__main__":   # required: worker processes are started with multiprocessing "spawn"
    main()
