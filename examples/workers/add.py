"""Worker script of examples/2-add-two-numbers.py."""
import os
import sys
from dataclasses import dataclass

EXAMPLES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(EXAMPLES))  # only needed when running from a checkout, not with lilota installed

from lilota.worker import LilotaWorker  # noqa: E402


@dataclass
class AddInput:
    a: int
    b: int


@dataclass
class AddOutput:
    sum: int


worker = LilotaWorker(db_url="sqlite:///" + os.path.join(EXAMPLES, "2-add-two-numbers.db"))


@worker.register("add", input_model=AddInput, output_model=AddOutput)
def add(data: AddInput) -> AddOutput:
    # data arrives as an AddInput instance, rebuilt from the JSON stored by schedule()
    return AddOutput(sum=data.a + data.b)


if __name__ == "__main__":
    worker.start()
