"""The Celery app the bench's workers run: tradebot's app and tasks, unchanged, plus two things.

- `bench.hop` / `bench.hop_last`: trivial tasks for the floor (a bare chain with
  the pipeline's hops on the same broker and queues); the last one stamps its
  end time in Redis.
- `BENCH_FEED=db`: the worker that serves the `okx` queue (COLLECTING) reads
  its market from the STORED candles (`ReplayFeed.from_db`, loaded once at
  start, before the pool forks), instead of the synthetic market the default
  settings build, which only knows BTC and ETH. The other workers need no feed.
  `BENCH_FEED=settings` leaves everything as a live worker has it.
"""
from __future__ import annotations

import os
import sys
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tradebot.settings")
django.setup()

from tradebot.celery import app  # noqa: E402

import tradebot.tasks as stage_tasks  # noqa: E402  (registers the stage tasks and the warm-up)

_redis = None


def _client():  # noqa: ANN202 - a redis.Redis
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(os.environ["REDIS_URL"])
    return _redis


def done_key(run: str) -> str:
    return f"{os.environ.get('CELERY_REDIS_KEY_PREFIX', '')}bench:done:{run}"


@app.task(name="bench.hop", bind=True, acks_late=True)
def hop(self, run: str) -> str:  # noqa: ANN001
    return run


@app.task(name="bench.hop_last", bind=True, acks_late=True)
def hop_last(self, run: str) -> None:  # noqa: ANN001
    _client().set(done_key(run), repr(time.time()), ex=3600)


def _queues() -> list[str]:
    argv = sys.argv
    for flag in ("-Q", "--queues"):
        if flag in argv and argv.index(flag) + 1 < len(argv):
            return argv[argv.index(flag) + 1].split(",")
    return []


def _install_stored_candles_feed() -> None:
    from django.conf import settings
    from django.db import connections

    from market.feeds.replay import ReplayFeed
    from market.models import Instrument
    from tradebot.stages import StageEnv

    if "okx" not in _queues():
        stage_tasks._ENV = StageEnv(feed=None, exchange=None)  # noqa: SLF001 - no stage of theirs reads the market
        return
    path = os.environ.get("BENCH_INSTRUMENTS_FILE")
    ids = (open(path).read().split() if path else  # noqa: SIM115
           list(Instrument.objects.filter(trading_enabled=True).values_list("inst_id", flat=True)))
    started = time.perf_counter()
    feed = ReplayFeed.from_db(inst_ids=ids, timeframes=list(settings.TIMEFRAMES))
    feed.name = "stored candles"
    stage_tasks._ENV = StageEnv(feed=feed, exchange=None)  # noqa: SLF001 - the worker's feed, built once
    connections.close_all()  # never hand an open connection to forked children
    print(f"bench worker: {len(ids)} instruments' stored candles loaded in {time.perf_counter() - started:.1f} s",
          flush=True)


if os.environ.get("BENCH_FEED") == "db":
    _install_stored_candles_feed()


# issue 20's llm_load section: when each account sync starts (the bench sent it at a known time).
SYNC_STARTS_KEY = "bench:sync_started"


def _sync_started(sender: object = None, task: object = None, **_: object) -> None:
    if getattr(task or sender, "name", "") == "tradebot.tasks.account_sync":
        _client().rpush(f"{os.environ.get('CELERY_REDIS_KEY_PREFIX', '')}{SYNC_STARTS_KEY}", repr(time.time()))


from celery.signals import task_prerun  # noqa: E402

task_prerun.connect(_sync_started, weak=False)
