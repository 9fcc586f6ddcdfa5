"""The Python zae-limiter (from PyPI) as a load client, for benches/python_comparison.rs.

Runs acquire + commit (`async with limiter.acquire(...)`) from N asyncio tasks over a set of
entities for a fixed time against DynamoDB, and prints one JSON line: acquires, seconds and
the client's own CPU time (getrusage) over the measured window.

Usage: zae_client.py ENDPOINT TABLE TASKS SECONDS ENTITIES WARMUP_SECONDS
"""

import asyncio
import json
import resource
import sys
import time

from zae_limiter import Limit, RateLimiter
from zae_limiter.repository import Repository
from zae_limiter.repository_builder import RepositoryBuilder


async def main() -> None:
    endpoint, table = sys.argv[1], sys.argv[2]
    tasks, seconds, entities = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    warmup = float(sys.argv[6])
    bootstrap = Repository(
        name=table, endpoint_url=endpoint, region="us-east-1", _skip_deprecation_warning=True
    )
    await bootstrap.create_table()
    repo = await (
        RepositoryBuilder().stack(table).endpoint_url(endpoint).region("us-east-1").build()
    )
    limiter = RateLimiter(repository=repo)
    limits = [Limit.per_minute("rpm", 1_000_000_000)]

    # Warm up: every bucket item exists and every cache is filled, as in the Rust client.
    for e in range(entities):
        async with limiter.acquire(f"e{e}", "bench", {"rpm": 1}, limits=limits):
            pass

    counts = [0] * tasks

    async def worker(i: int, deadline: float) -> None:
        n = i
        while time.monotonic() < deadline:
            async with limiter.acquire(f"e{n % entities}", "bench", {"rpm": 1}, limits=limits):
                pass
            counts[i] += 1
            n += tasks

    # Then the same load unmeasured, so DynamoDB Local's JVM has compiled its hot paths.
    await asyncio.gather(*(worker(i, time.monotonic() + warmup) for i in range(tasks)))
    counts = [0] * tasks
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    await asyncio.gather(*(worker(i, start + seconds) for i in range(tasks)))
    elapsed = time.monotonic() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    await limiter.close()
    await bootstrap.close()
    print(json.dumps({"acquires": sum(counts), "seconds": elapsed, "cpu_seconds": cpu}))


asyncio.run(main())
