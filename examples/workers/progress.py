"""Worker script of examples/5-setting-task-progress-manually.py."""
import os
import sys
import time
from dataclasses import dataclass

EXAMPLES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(EXAMPLES))  # only needed when running from a checkout, not with lilota installed

from lilota.models import TaskProgress  # noqa: E402
from lilota.worker import LilotaWorker  # noqa: E402


@dataclass
class ProcessInput:
    files: int


@dataclass
class ProcessOutput:
    processed: int


# set_progress_manually=True: the task reports its own progress (otherwise lilota sets 100 at the end).
worker = LilotaWorker(db_url="sqlite:///" + os.path.join(EXAMPLES, "5-setting-task-progress-manually.db"),
                      set_progress_manually=True)


@worker.register("process_files", input_model=ProcessInput, output_model=ProcessOutput, task_progress=TaskProgress)
def process_files(data: ProcessInput, task_progress: TaskProgress) -> ProcessOutput:
    for done in range(1, data.files + 1):
        time.sleep(0.1)                                # stands for real work on one file
        task_progress.set(done * 100 // data.files)    # an int from 0 to 100, stored at once
    return ProcessOutput(processed=data.files)


if __name__ == "__main__":
    worker.start()
