"""The Celery app of the busy-llm test's workers: tradebot's app and tasks, unchanged, plus three things.

- `tests.llm_hold`: one real gateway call (the screener's spec) that the test's slow model server holds, to keep
  an llm worker thread busy the way a long analyst call does.
- `tests.okx_hold`: holds the okx worker for a given time, the way a tick's COLLECTING tasks (hundreds of
  snapshots, each reading OKX) hold it; its start and end go to Redis (`<prefix>tests:okx_hold`).
- The start time of every account sync, pushed to Redis (`<prefix>tests:sync_started`), to see it ran on time.
"""
from __future__ import annotations

import os
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tradebot.settings")
django.setup()

from celery.signals import task_prerun  # noqa: E402

import tradebot.tasks  # noqa: E402,F401  (registers the stage tasks)
from tradebot.celery import app  # noqa: E402

SYNC_KEY = "tests:sync_started"
OKX_HOLD_KEY = "tests:okx_hold"


def _redis():  # noqa: ANN202 - a redis.Redis
    import redis

    return redis.Redis.from_url(os.environ["REDIS_URL"])


def _key(name: str) -> str:
    return os.environ.get("CELERY_REDIS_KEY_PREFIX", "") + name


@app.task(name="tests.llm_hold", acks_late=True)
def llm_hold(tag: str) -> str:
    from brain.claude import call_spec
    from brain.llm import llm_call_structured
    from brain.schemas import ScreenResult

    return llm_call_structured(spec=call_spec("screen"), system_static=["hold the thread"], user=f"hold {tag}",
                               output_type=ScreenResult).status


@app.task(name="tests.okx_hold", acks_late=True)
def okx_hold(seconds: float) -> None:
    client = _redis()
    client.rpush(_key(OKX_HOLD_KEY), f"start {time.time()!r}")
    time.sleep(seconds)
    client.rpush(_key(OKX_HOLD_KEY), f"end {time.time()!r}")


def _sync_started(sender: object = None, task: object = None, **_: object) -> None:
    if getattr(task or sender, "name", "") == "tradebot.tasks.account_sync":
        _redis().rpush(_key(SYNC_KEY), repr(time.time()))


task_prerun.connect(_sync_started, weak=False)
