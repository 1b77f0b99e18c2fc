"""Worker script of examples/1-hello-world.py."""
import os
import sys

EXAMPLES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(EXAMPLES))  # only needed when running from a checkout, not with lilota installed

from lilota.worker import LilotaWorker  # noqa: E402

worker = LilotaWorker(db_url="sqlite:///" + os.path.join(EXAMPLES, "1-hello-world.db"))


# No input model, no output model: the function takes no argument and returns a plain dict.
@worker.register("hello_world")
def hello_world():
    return {"message": "Hello World"}


if __name__ == "__main__":
    worker.start()
