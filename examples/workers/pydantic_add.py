"""Worker script of examples/3-add-two-numbers-using-pydantic.py (needs pydantic installed)."""
import os
import sys

from pydantic import BaseModel

EXAMPLES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(EXAMPLES))  # only needed when running from a checkout, not with lilota installed

from lilota.worker import LilotaWorker  # noqa: E402


class AddInput(BaseModel):
    a: int
    b: int


class AddOutput(BaseModel):
    sum: int


worker = LilotaWorker(db_url="sqlite:///" + os.path.join(EXAMPLES, "3-add-two-numbers-using-pydantic.db"))


@worker.register("add", input_model=AddInput, output_model=AddOutput)
def add(data: AddInput) -> AddOutput:
    # data was validated by pydantic: AddInput.model_validate(<the stored JSON>)
    return AddOutput(sum=data.a + data.b)


if __name__ == "__main__":
    worker.start()
