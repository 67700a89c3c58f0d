from __future__ import annotations

from tradebot.celery import QUEUES, app, route_task
from tradebot.pipeline import stage_signature
from tradebot.stages import STAGES


def test_tasks_are_routed_by_module() -> None:
    assert route_task("market.tasks.candles_refresh", (), {}, {}) == {"queue": "okx"}
    assert route_task("execution.tasks.order_place", (), {}, {}) == {"queue": "orders"}
    assert route_task("brain.tasks.screen", (), {}, {}) == {"queue": "llm"}
    assert route_task("brain.reflection.tasks.post_trade", (), {}, {}) == {"queue": "reflection"}
    assert route_task("journal.tasks.cycle_journal", (), {}, {}) == {"queue": "default"}


def test_what_places_confirms_or_reconciles_goes_to_the_orders_queue_however_it_is_sent() -> None:
    """EXECUTING/CONFIRMING and the account sync never share the okx worker with COLLECTING (issue 20)."""
    queues = {stage: queue for stage, _, queue in STAGES}
    assert queues["EXECUTING"] == "orders" and queues["COLLECTING"] == "okx"
    # Sent by name without a queue (the router) or as the pipeline's signature (its own queue): the same queue.
    router = app.amqp.router
    for name in ("tradebot.tasks.account_sync", "tradebot.tasks.cycle_execute", "execution.tasks.account_sync_task"):
        assert router.route({}, name)["queue"].name == "orders", name
    assert router.route({}, "tradebot.tasks.cycle_collect")["queue"].name == "default"  # only ever sent with its queue
    assert stage_signature("EXECUTING", 1).options["queue"] == "orders"
    assert stage_signature("COLLECTING", 1).options["queue"] == "okx"


def test_a_retry_or_a_redelivery_goes_back_to_the_queue_it_came_from() -> None:
    """A stage's retry is sent with the delivery's own exchange and routing key; a sender's queue wins the router."""
    from celery.app.task import Context

    from tradebot.tasks import cycle_execute

    request = Context(args=(7,), kwargs={}, delivery_info={"exchange": "orders", "routing_key": "orders"}, id="x")
    options = cycle_execute.signature_from_request(request).options
    assert options["routing_key"] == "orders" and options["exchange"] == "orders"
    assert app.amqp.router.route({"queue": "okx"}, "tradebot.tasks.account_sync")["queue"].name == "okx"


def test_the_app_speaks_json_only_and_takes_one_task_at_a_time() -> None:
    conf = app.conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert conf.beat_scheduler == "tradebot.beat:OutageProofScheduler"  # django-celery-beat's, outage-proof (#16)
    assert {q.name for q in conf.task_queues} == set(QUEUES) == {"okx", "orders", "llm", "reflection", "default"}
