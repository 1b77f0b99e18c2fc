"""The worker script of the lilota benchmark: run by Lilota's worker processes.

No db_url: a worker under a supervising Lilota uses the application's database.
"""
import os
import sys
import time

sys.path.insert(0, os.environ.get("BENCH_LILOTA_PATH") or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lilota import LilotaWorker, TaskContext  # noqa: E402

worker = LilotaWorker()


@worker.register("noop")
def noop(data):
    return None


@worker.register("cpu10")
def cpu10(data):
    """10 ms of CPU time of this thread: real work, so that the overhead per task shows."""
    end = time.thread_time() + 0.010
    while time.thread_time() < end:
        pass
    return None


@worker.register("stamp")
def stamp(data):
    """The time the task function started, for the latency workload."""
    return {"t": time.time()}


@worker.register("steps")
def steps(data, ctx: TaskContext):
    """``data["steps"]`` durable steps of a no-op, each storing a small result (issue 20)."""
    for i in range(data["steps"]):
        ctx.step("step", int, i)
    return None


if __name__ == "__main__":
    worker.start()
