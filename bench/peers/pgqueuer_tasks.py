"""pgqueuer's worker factory and entrypoints for the benchmark, run by ``pgqueuer.run("pgqueuer_tasks:main")``.

As pgqueuer's quick start and performance guide have it: one asyncpg connection of its own for
the worker ("always use a direct asyncpg connection (not a pool) for the QueueManager"), async
entrypoints.
"""
import contextlib
import os
import socket
import time

import asyncpg
from pgqueuer import PgQueuer


@contextlib.asynccontextmanager
async def main():
    connection = await asyncpg.connect(os.environ["BENCH_DB_URL"])
    pgq = PgQueuer.from_asyncpg_connection(connection)

    @pgq.entrypoint("noop")
    async def noop(job):
        return None

    @pgq.entrypoint("stamp")
    async def stamp(job):
        """Send the time the entrypoint started to the application's UDP port (the payload):
        pgqueuer stores no results."""
        started = time.time()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(repr(started).encode(), ("127.0.0.1", int(job.payload)))

    try:
        yield pgq
    finally:
        await connection.close()
