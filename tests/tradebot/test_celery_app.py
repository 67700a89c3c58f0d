from __future__ import annotations

from tradebot.celery import QUEUES, app, route_task


def test_tasks_are_routed_by_module() -> None:
    assert route_task("market.tasks.candles_refresh", (), {}, {}) == {"queue": "okx"}
    assert route_task("execution.tasks.order_place", (), {}, {}) == {"queue": "okx"}
    assert route_task("brain.tasks.screen", (), {}, {}) == {"queue": "llm"}
    assert route_task("brain.reflection.tasks.post_trade", (), {}, {}) == {"queue": "reflection"}
    assert route_task("journal.tasks.cycle_journal", (), {}, {}) == {"queue": "default"}


def test_the_app_speaks_json_only_and_takes_one_task_at_a_time() -> None:
    conf = app.conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert conf.beat_scheduler == "tradebot.beat:OutageProofScheduler"  # django-celery-beat's, outage-proof (#16)
    assert {q.name for q in conf.task_queues} == set(QUEUES) == {"okx", "llm", "reflection", "default"}
