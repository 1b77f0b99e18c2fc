"""procrastinate's app and tasks for the benchmark (imported by the application and by the workers).

The tasks are ``async`` functions, as procrastinate's documentation asks of tasks run with a
worker ``concurrency`` above 1 (a synchronous task runs in a thread of the worker). The pool
holds as many connections as the concurrency: "the shorter your average job execution time, the
more your pool will need to contain as many connections as your concurrency" (procrastinate's
discussion of pool size); LISTEN has a connection of its own, outside the pool.
"""
import os
import socket
import time

import procrastinate

# Sub-workers per worker process (``procrastinate worker --concurrency``), read by the workloads.
CONCURRENCY = int(os.environ.get("BENCH_PROCRASTINATE_CONCURRENCY", "1"))

app = procrastinate.App(connector=procrastinate.PsycopgConnector(
    conninfo=os.environ["BENCH_DB_URL"], min_size=CONCURRENCY, max_size=CONCURRENCY))


@app.task(name="noop")
async def noop(i=None):
    return None


@app.task(name="stamp")
async def stamp(port):
    """Send the time the task function started to the application's UDP ``port``: procrastinate
    stores no task results."""
    started = time.time()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(repr(started).encode(), ("127.0.0.1", port))
