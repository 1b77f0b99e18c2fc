"""3. Add two numbers using pydantic input and output models.

Needs pydantic (v1 or v2):  pip install pydantic
Run it from the repository root:  python examples/3-add-two-numbers-using-pydantic.py

lilota serializes pydantic models itself (model_dump(mode="json") on v2, .dict() on v1) and
rebuilds the task function's input with model_validate() / parse_obj(); no as_dict() is needed.
"""
import os
import sys

from pydantic import BaseModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # only needed when running from a checkout, not with lilota installed

from lilota.core import Lilota  # noqa: E402

DB_PATH = os.path.join(HERE, "3-add-two-numbers-using-pydantic.db")   # as in workers/pydantic_add.py


class AddInput(BaseModel):
    a: int
    b: int


class AddOutput(BaseModel):
    sum: int


def main():
    # Start from an empty database on every run.
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(DB_PATH + suffix):
            os.remove(DB_PATH + suffix)

    with Lilota(db_url="sqlite:///" + DB_PATH,
                script_path=os.path.join(HERE, "workers", "pydantic_add.py"),
                number_of_workers=2) as lilota:
        task_id = lilota.schedule("add", AddInput(a=2, b=3))
        task = lilota.wait(task_id, timeout=60)
        print(task.output)                          # stored as a dict: {'sum': 5}
        output = AddOutput(**task.output)           # or AddOutput.model_validate(task.output)
        print(f"2 + 3 = {output.sum} ({type(output).__name__})")


if __name__ == "__main__":   # required: worker processes are started with multiprocessing "spawn"
    main()
