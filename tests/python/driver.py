"""Drives the Python zae-limiter (from PyPI) for the interop tests: one JSON command on
stdin (or in argv[1]), one JSON answer on stdout. Every command opens the table through Python's normal
path (`RepositoryBuilder(...).build()`), as a Python service would.

Commands (`op`):
- `open`: open the table and namespace; answers `{}`.
- `acquire`: `n` acquire + commit of `consume` for `entity`/`resource` (stored limits, or
  `limits` as `[name, capacity, refill_amount, period_seconds]`) from `tasks` asyncio
  tasks; answers counts of `admitted`, `rejected` and each other exception by class, and
  the DynamoDB calls made (`calls`) by operation, after `warmup` unmeasured acquires.
- `create_entity`: `entity`, `parent`, `cascade`.
- `set_limits`: at `level` `entity` (with `entity`, `resource`), `resource` or `system`.
- `audit`: the audit events of `entity` (`$SYSTEM` for the system), newest first.
- `get_entity`: the entity as Python reads it.
- `disable_resource` / `enable_resource`: `resource`, config and bucket stamps.
- `registries`: the resources with defaults, and those with entity configs.
- `usage`: the usage snapshots of `entity` (and `resource`), as Python's
  `get_usage_snapshots` reads them.
- `process_records`: Python's own aggregator (`process_stream_records`) on `records`
  (Lambda-style stream records) for `windows`, in batches of `batch`; answers its counts,
  errors, the seconds it took and the DynamoDB calls it made.
- `bump_shards`: doubles the `shard_count` of `entity`/`resource`'s bucket from each count
  in `from` in turn, as Python's client does when a bucket runs out of write capacity;
  answers the counts reached.

A limit is `[name, capacity, refill_amount, period_seconds]`, optionally with a fifth
element of keyword arguments (`{"soft": true}`).

Errors answer `{"error": class name, "message": text}`.
"""

import asyncio
import json
import sys
from collections import Counter

from zae_limiter import Limit, RateLimiter
from zae_limiter.exceptions import RateLimitExceeded
from zae_limiter.repository_builder import RepositoryBuilder


def limit(spec):
    name, capacity, amount, period = spec[:4]
    extra = spec[4] if len(spec) > 4 else {}
    return Limit(name=name, capacity=capacity, refill_amount=amount,
                 refill_period_seconds=period, **extra)


async def open_limiter(cmd):
    builder = (
        RepositoryBuilder()
        .stack(cmd["table"])
        .namespace(cmd.get("namespace", "default"))
        .endpoint_url(cmd["endpoint"])
        .region("us-east-1")
        .config_cache_ttl(cmd.get("config_cache_ttl", 0))
    )
    repo = await builder.build()
    return repo, RateLimiter(repository=repo)


def count_calls(repo, calls):
    """Counts the DynamoDB operations the repository's client sends."""

    async def hook():
        client = await repo._get_client()
        client.meta.events.register(
            "before-call.dynamodb.*",
            lambda model, **_: calls.update([model.name]),
        )

    return hook()


async def run(cmd):
    repo, limiter = await open_limiter(cmd)
    try:
        op = cmd["op"]
        if op == "open":
            return {}
        if op == "create_entity":
            await limiter.create_entity(
                cmd["entity"], parent_id=cmd.get("parent"), cascade=cmd.get("cascade", False)
            )
            return {}
        if op == "get_entity":
            e = await limiter.get_entity(cmd["entity"])
            if e is None:
                return {"entity": None}
            return {"entity": {"id": e.id, "parent_id": e.parent_id, "cascade": e.cascade,
                               "name": e.name}}
        if op == "set_limits":
            limits = [limit(l) for l in cmd["limits"]]
            level = cmd["level"]
            if level == "entity":
                await limiter.set_limits(cmd["entity"], limits, resource=cmd["resource"])
            elif level == "resource":
                await limiter.set_resource_defaults(cmd["resource"], limits)
            else:
                await limiter.set_system_defaults(limits)
            return {}
        if op == "registries":
            return {"resources": sorted(await limiter.list_resources_with_defaults()),
                    "entity_config_resources":
                        sorted(await limiter.list_resources_with_entity_configs())}
        if op == "usage":
            snaps, _ = await repo.get_usage_snapshots(
                entity_id=cmd.get("entity"), resource=cmd.get("resource"),
                window_type=cmd.get("window"))
            return {"snapshots": [{"window": x.window_type, "window_start": x.window_start,
                                   "counters": x.counters, "total_events": x.total_events}
                                  for x in snaps]}
        if op == "process_records":
            calls = Counter()
            # The aggregator reaches DynamoDB through boto3's environment.
            import os
            os.environ["AWS_ENDPOINT_URL"] = cmd["endpoint"]
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "zaelimiterlocal")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
            import time
            import boto3
            from zae_limiter_aggregator.processor import process_stream_records
            boto3.setup_default_session()
            boto3.DEFAULT_SESSION.events.register(
                "before-call.dynamodb.*", lambda model, **_: calls.update([model.name]))
            records, batch = cmd["records"], cmd.get("batch") or len(cmd["records"]) or 1
            processed, updated, errors = 0, 0, []
            started = time.perf_counter()
            for i in range(0, len(records), batch):
                result = process_stream_records(records[i:i + batch], cmd["table"],
                                                cmd["windows"])
                processed += result.processed_count
                updated += result.snapshots_updated
                errors.extend(result.errors)
            return {"processed": processed, "snapshots_updated": updated, "errors": errors,
                    "seconds": time.perf_counter() - started, "calls": dict(calls)}
        if op == "bump_shards":
            return {"counts": [await repo.bump_shard_count(cmd["entity"], cmd["resource"], c)
                               for c in cmd["from"]]}
        if op == "disable_resource":
            return {"stamped": await repo.disable_resource(cmd["resource"])}
        if op == "enable_resource":
            return {"stamped": await repo.enable_resource(cmd["resource"])}
        if op == "audit":
            events = await limiter.get_audit_events(cmd["entity"], limit=cmd.get("limit", 100))
            return {"events": [{"event_id": e.event_id, "action": str(getattr(e.action, "value", e.action)),
                                "timestamp": str(e.timestamp)} for e in events]}
        if op == "acquire":
            limits = [limit(l) for l in cmd["limits"]] if cmd.get("limits") else None
            outcomes = Counter()
            calls = Counter()
            n, tasks = cmd["n"], cmd.get("tasks", 1)
            # Unmeasured acquires first, so caches are warm (as on a running service).
            for _ in range(cmd.get("warmup", 0)):
                async with limiter.acquire(
                    cmd["entity"], cmd["resource"], cmd["consume"], limits=limits
                ):
                    pass
            await count_calls(repo, calls)

            async def worker(share):
                for _ in range(share):
                    try:
                        async with limiter.acquire(
                            cmd["entity"], cmd["resource"], cmd["consume"], limits=limits
                        ):
                            pass
                        outcomes["admitted"] += 1
                    except RateLimitExceeded:
                        outcomes["rejected"] += 1
                    except Exception as e:  # noqa: BLE001 - reported by class
                        outcomes[type(e).__name__] += 1
                        outcomes["last_error"] = 0
                        outcomes_messages.append(f"{type(e).__name__}: {e}")

            outcomes_messages = []
            shares = [n // tasks + (1 if i < n % tasks else 0) for i in range(tasks)]
            await asyncio.gather(*(worker(s) for s in shares))
            return {"outcomes": dict(outcomes), "calls": dict(calls),
                    "messages": outcomes_messages[:3]}
        return {"error": "UnknownCommand", "message": op}
    finally:
        await limiter.close()


def main():
    cmd = json.loads(sys.argv[1]) if len(sys.argv) > 1 else json.load(sys.stdin)
    try:
        answer = asyncio.run(run(cmd))
    except Exception as e:  # noqa: BLE001 - the test reads the class
        answer = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(answer))


main()
