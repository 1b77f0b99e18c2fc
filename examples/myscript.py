"""The worker script of the quick example: python examples/quick_example.py runs it in worker processes.

It can also run on its own (python examples/myscript.py) and execute tasks until Ctrl-C.
"""
import os
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # only needed when running from a checkout, not with lilota installed

from lilota.worker import LilotaWorker  # noqa: E402

# The database file lives next to this script, whatever the current directory is.
DB_URL = "sqlite:///" + os.path.join(HERE, "quick_example.db")


@dataclass
class AddInput():
    a: int
    b: int


@dataclass
class AddOutput():
    sum: int


worker = LilotaWorker(db_url=DB_URL)


@worker.register("add", input_model=AddInput, output_model=AddOutput)
def add(data: AddInput) -> AddOutput:
    return AddOutput(sum=data.a + data.b)


def main():
    worker.start()


if __name__ == "__main__":
    main()
